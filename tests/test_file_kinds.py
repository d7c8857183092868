"""file_kinds: what a path is, by os.stat alone."""

import os
import socket
import stat

import pytest

from leo_tf import file_kinds


def test_each_kind_of_path_is_named_without_opening_it(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")  # opening it would block
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "sock"))
        described = {
            name: file_kinds.describe(tmp_path / name)
            for name in ("file", "folder", "fifo", "sock", "dangling")
        }
    assert described == {
        "file": "a regular file",
        "folder": "a directory",
        "fifo": "a FIFO (named pipe)",
        "sock": "a socket",
        "dangling": f"a broken symbolic link to {str(tmp_path / 'missing')!r}",
    }
    assert file_kinds.describe(tmp_path / "file" / "below") == "unreadable"


@pytest.mark.parametrize(
    "mode, kind",
    [
        (stat.S_IFCHR, "a character device"),
        (stat.S_IFBLK, "a block device"),
        (stat.S_IFLNK, "a special file"),  # os.stat follows links: never seen
    ],
)
def test_modes_without_a_file_to_make_are_named_too(mode, kind):
    assert file_kinds.kind_of_mode(mode | 0o644) == kind
