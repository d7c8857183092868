"""Class ids, keys, and atomic writing of the embedding pickles.

Files, for each split in (train, val, test):

    <data_path>/<dataset_name>/<embedding_crop>/<split>_embeddings.pkl

a pickled dict (protocol 4) of
    "embeddings": float32 [n, D],
    "keys":       str [n], "<dataset_name>-<class_id>-<class_id>_<index>.png",
    "labels":     int64 [n], the class's index within the split (0..C-1),
rows grouped by class, classes in class-id order. Class ids are
"<dataset_name>C<number>" (e.g. "omniglotC0007"), numbered over train, then
val, then test classes; they hold only letters and digits, so a key has
exactly three '-'-separated fields and its file name's part before the first
'_' is the class id, as LEO's reader expects. `<index>` is the image's index
within its class (source order). The same directory gets `classes.json`,
mapping each class id to its source class name, group, split, label and
image count.

Each file is written to a temporary file in the same directory, and all of
them are then renamed into place together (`FileSet`), so a reader never sees
a half-written file, nor a new pickle beside old ones. `check_output_folder`,
called before any image is read, refuses a folder that cannot be written and
one that already holds these files, unless --overwrite allows to replace
them: LEO runs may read them.
"""

import json
import os
import pathlib
import pickle
import re
import signal
import tempfile
import threading
from typing import List, Sequence

import numpy as np

from leo_tf import file_kinds
from leo_tf.data import embeddings as embeddings_lib

PICKLE_PROTOCOL = 4
CLASSES_FILE = "classes.json"

_DATASET_NAME = re.compile(r"[A-Za-z0-9]+")


def check_dataset_name(name: str) -> str:
    """Returns `name` if it is letters and digits only, else raises ValueError."""
    if not _DATASET_NAME.fullmatch(name or ""):
        raise ValueError(
            f"--dataset_name={name!r}: expected letters and digits only (it "
            "starts every key and class id, whose fields are separated by '-' "
            "and '_')"
        )
    return name


class OutputError(ValueError):
    """The output folder cannot take the pickles; the message names the flag."""


def output_files(data_path, dataset_name, embedding_crop) -> List[pathlib.Path]:
    """The files a run writes: the split pickles, then classes.json."""
    pickles = [
        embeddings_lib.split_path(data_path, dataset_name, embedding_crop, split)
        for split in embeddings_lib.SPLITS
    ]
    return pickles + [pickles[0].parent / CLASSES_FILE]


def check_output_folder(data_path, dataset_name, embedding_crop, overwrite) -> None:
    """Raises OutputError unless the run's files can be written.

    The folder `<data_path>/<dataset_name>/<embedding_crop>` must be a
    writable directory or creatable in one; files of an earlier run there
    are refused unless `overwrite`, and are replaced only if they are files.

    Args:
      data_path, dataset_name, embedding_crop: the flags of the same names.
      overwrite: --overwrite.
    """
    files = output_files(data_path, dataset_name, embedding_crop)
    folder = files[0].parent
    cannot = f"--data_path={data_path}: cannot write the embeddings there"
    nearest = next(p for p in (folder, *folder.parents) if os.path.lexists(p))
    if not nearest.is_dir():
        raise OutputError(
            f"{cannot}: {nearest} is {file_kinds.describe(nearest)}, not a directory"
        )
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise OutputError(f"{cannot}: {nearest} is not writable")
    existing = [path for path in files if os.path.lexists(path)]
    for path in existing:
        if not path.is_file():
            raise OutputError(
                f"{cannot}: {path} is {file_kinds.describe(path)}, not a file"
            )
    if existing and not overwrite:
        names = [path.name for path in existing]
        listed = ", ".join(names[:-1]) + " and " if len(names) > 1 else ""
        raise OutputError(
            f"--data_path={data_path}: {folder} already holds {listed}{names[-1]} "
            "of an earlier run, which LEO runs may read; pass --overwrite to "
            "replace them, or choose another --data_path, --dataset_name or "
            "--embedding_crop"
        )


def make_class_ids(dataset_name: str, num_classes: int) -> list:
    """["<dataset_name>C0000", ...]: num_classes ids, zero-padded to >= 4 digits."""
    check_dataset_name(dataset_name)
    digits = max(4, len(str(num_classes - 1)))
    return [f"{dataset_name}C{i:0{digits}d}" for i in range(num_classes)]


def make_keys(dataset_name: str, row_class_ids: Sequence[str]) -> np.ndarray:
    """Keys for rows grouped by class.

    Args:
      dataset_name: first key field.
      row_class_ids: str [n], each row's class id.

    Returns:
      str [n], "<dataset_name>-<class_id>-<class_id>_<index>.png", index
      counting each class's rows from 0 (4+ digits).
    """
    seen = {}
    keys = []
    for class_id in row_class_ids:
        index = seen.get(class_id, 0)
        seen[class_id] = index + 1
        keys.append(f"{dataset_name}-{class_id}-{class_id}_{index:04d}.png")
    return np.array(keys, dtype=str)


def _umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary_copy(path: str, write_fn, mode: str) -> str:
    """Calls write_fn(file) on a new temporary file beside `path`; its path."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, mode) as file:
            write_fn(file)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp makes the file private (0600); give it the usual permissions.
        os.chmod(temp_path, 0o666 & ~_umask())
    except BaseException:
        os.remove(temp_path)
        raise
    return temp_path


class FileSet:
    """Files that replace their predecessors together: the old set or the new.

    Each file is written to a temporary file beside its destination
    (`write_split`, `write_json`); `commit` then renames them all into place,
    handling a SIGINT or SIGTERM that arrives meanwhile after the last, so a
    run stopped while writing (or failing to write one of them) leaves every
    earlier file as it was. Leaving the `with` block without a commit removes
    the temporaries.
    """

    def __init__(self):
        self._staged = []  # [(temporary path, destination)]

    def add(self, path: str, write_fn, mode: str) -> None:
        """Writes `path`'s new content (write_fn(file), file opened in `mode`)
        to a temporary file; OutputError, naming it, if that fails."""
        try:
            self._staged.append((_temporary_copy(path, write_fn, mode), path))
        except OSError as error:
            raise OutputError(
                f"could not write {path}: {error.strerror or error}; nothing "
                "was replaced (any earlier files there are as they were)"
            ) from error

    def commit(self) -> None:
        """Renames every file into place; a SIGINT or SIGTERM that arrives
        meanwhile is handled after the last (on the main thread, where Python
        handles signals)."""
        held = []
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                previous[number] = signal.signal(
                    number, lambda number, frame: held.append(number)
                )
        try:
            while self._staged:
                temp_path, path = self._staged[0]
                os.replace(temp_path, path)
                self._staged.pop(0)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            for number in dict.fromkeys(held):
                signal.raise_signal(number)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for temp_path, _ in self._staged:
            if os.path.exists(temp_path):
                os.remove(temp_path)
        self._staged = []


def write_split(
    files: FileSet,
    path: str,
    embeddings: np.ndarray,
    keys: np.ndarray,
    labels: np.ndarray,
) -> None:
    """Adds one split's pickle to `files`.

    Args:
      files: the FileSet it is committed with.
      path: destination .pkl.
      embeddings: float32 [n, D].
      keys: str [n].
      labels: int [n].
    """
    n = embeddings.shape[0]
    if embeddings.ndim != 2 or keys.shape != (n,) or labels.shape != (n,):
        raise ValueError(
            f"{path}: expected embeddings [n, D], keys [n], labels "
            f"[n]; found {embeddings.shape}, {keys.shape}, "
            f"{labels.shape}"
        )
    record = {
        "embeddings": embeddings.astype(np.float32),
        "keys": keys.astype(str),
        "labels": labels.astype(np.int64),
    }
    files.add(path, lambda f: pickle.dump(record, f, PICKLE_PROTOCOL), "wb")


def write_json(files: FileSet, path: str, content) -> None:
    """Adds `content`, as indented, key-sorted JSON, to `files`."""
    files.add(
        path, lambda f: f.write(json.dumps(content, indent=1, sort_keys=True)), "w"
    )
