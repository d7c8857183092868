"""What a path is, in the words of leo_tf's error messages."""

import os
import stat

_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def kind_of_mode(mode: int) -> str:
    """ "a regular file", "a directory", "a FIFO (named pipe)", ...: the kind of
    file that `os.stat`'s st_mode `mode` describes ("a special file" if none
    of those)."""
    return next((kind for test, kind in _KINDS if test(mode)), "a special file")


def describe(path) -> str:
    """What `path` is (`kind_of_mode`), by `os.stat` alone: never opened, so
    a FIFO does not block; "a broken symbolic link to 'target'" or
    "unreadable" where `os.stat` fails."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        if os.path.islink(path):
            return f"a broken symbolic link to {os.readlink(path)!r}"
        return "unreadable"
    return kind_of_mode(mode)
