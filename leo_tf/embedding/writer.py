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

Each file is written to a temporary file in the same directory and renamed
into place, so a reader never sees a half-written file.
"""

import json
import os
import pickle
import re
import tempfile
from typing import Sequence

import numpy as np

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


def _atomic_write(path: str, write_fn, mode: str) -> None:
    """Calls write_fn(file) on a temporary file, then renames it to `path`."""
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
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def write_split(
    path: str, embeddings: np.ndarray, keys: np.ndarray, labels: np.ndarray
) -> None:
    """Writes one split's pickle atomically.

    Args:
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
    _atomic_write(path, lambda f: pickle.dump(record, f, PICKLE_PROTOCOL), "wb")


def write_json(path: str, content) -> None:
    """Writes `content` as indented, key-sorted JSON, atomically."""
    _atomic_write(
        path, lambda f: f.write(json.dumps(content, indent=1, sort_keys=True)), "w"
    )
