"""Refuses splits that share classes or examples: a leak between them.

A meta-test accuracy means something only when the meta-test classes were
never seen in meta-training, and the meta-validation classes (which pick the
best checkpoint) are neither. `check_disjoint` compares two splits' class ids
and their examples; every example row is reduced to a 64-bit hash of its
bytes, so identical rows are found by a set intersection, linear in the
number of examples, instead of comparing rows pairwise. Two different rows
share a hash with probability about 2^-64 per pair. All-zero rows are not
compared: they say nothing of their image (an embedding network whose ReLU
features are all off for an image gives one), so two splits may both hold
some.

Fingerprints (class ids and row hashes) of split files are kept per file,
keyed by its path, inode, size and modification time, so a process that
loads several splits reads each file once for these checks. Python's hash of
bytes is salted per process: fingerprints are only compared within one.
"""

import dataclasses
import os

import numpy as np

from leo_tf.data import embeddings

# Fingerprints kept: a run needs three (train, val, test).
_CACHE_SIZE = 8
_fingerprints = {}  # (path, device, inode, size, mtime) -> Fingerprint


@dataclasses.dataclass(frozen=True, eq=False)
class Fingerprint:
    """What the overlap check needs of a split.

    Attributes:
      source: the file(s) the split came from, for messages.
      class_ids: str `[n]`, the class of each example.
      hashes: int64 `[n]`, a hash of each example's float32 bytes.
      zero: bool `[n]`, whether the example's row is all zeros.
    """

    source: str
    class_ids: np.ndarray
    hashes: np.ndarray
    zero: np.ndarray


def _row_hashes(rows: np.ndarray) -> np.ndarray:
    """int64 `[n]`: a hash of the bytes of each row of float32 `[n, D]`."""
    data = np.ascontiguousarray(rows, dtype=np.float32).tobytes()
    width = len(data) // len(rows)
    return np.array(
        [hash(data[start : start + width]) for start in range(0, len(data), width)],
        dtype=np.int64,
    )


def _zero_rows(rows: np.ndarray) -> np.ndarray:
    """bool `[n]`: which rows of `[n, D]` are all zeros (either sign)."""
    return ~np.asarray(rows).any(axis=1)


def fingerprint(classes: embeddings.ClassEmbeddings) -> Fingerprint:
    """The class ids, row hashes and zero rows of `classes`."""
    arrays = classes.embeddings.values()
    return Fingerprint(
        classes.source,
        np.repeat(np.array(classes.class_ids), classes.examples_per_class),
        np.concatenate([_row_hashes(rows) for rows in arrays]),
        np.concatenate([_zero_rows(rows) for rows in arrays]),
    )


def file_fingerprint(path, classes=None) -> Fingerprint:
    """The fingerprint of the split file `path`, computed once per version.

    Args:
      path: a split's pickle.
      classes: its `ClassEmbeddings` when they were just read, to save
        reading the file again; None reads it.

    Raises:
      DataError: the file is missing or malformed.
    """
    status = os.stat(path)
    key = (str(path), status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
    if key not in _fingerprints:
        if classes is not None:
            found = fingerprint(classes)
        else:
            class_ids, rows = embeddings.read_rows(path)
            found = Fingerprint(
                str(path), class_ids, _row_hashes(rows), _zero_rows(rows)
            )
        if len(_fingerprints) >= _CACHE_SIZE:
            del _fingerprints[next(iter(_fingerprints))]
        _fingerprints[key] = found
    return _fingerprints[key]


def check_disjoint(name: str, split: Fingerprint, other_name: str, other: Fingerprint):
    """Refuses two splits that share a class id or an identical example.

    All-zero examples are not compared (module docstring).

    Args:
      name, split: the split named in the message first, and its
        fingerprint.
      other_name, other: the split it is compared with.

    Raises:
      DataError: naming both files, the shared classes (up to five), or the
        number of identical examples and a class holding one on each side.
    """
    where = f"{split.source}: split {name!r}"
    against = f"split {other_name!r} ({other.source})"
    remedy = "a leak between the splits; pass --allow_split_overlap to use them anyway"
    shared = np.intersect1d(split.class_ids, other.class_ids).tolist()
    if shared:
        shown = ", ".join(map(repr, shared[:5]))
        more = f" and {len(shared) - 5} more" if len(shared) > 5 else ""
        num_classes = len(np.unique(split.class_ids))
        raise embeddings.DataError(
            f"{where} shares {len(shared)} of its {num_classes} classes "
            f"with {against}: {shown}{more}; {remedy}"
        )
    identical = np.isin(split.hashes, other.hashes[~other.zero]) & ~split.zero
    if identical.any():
        first = np.argmax(identical)
        other_first = np.argmax(other.hashes == split.hashes[first])
        raise embeddings.DataError(
            f"{where} has {int(identical.sum())} of its {len(identical)} examples "
            f"identical to examples of {against}, e.g. in class "
            f"{str(split.class_ids[first])!r} (identical to one of class "
            f"{str(other.class_ids[other_first])!r}); {remedy}"
        )
