"""Reads and validates LEO's pre-computed embedding pickles.

The published archive unpacks to

    <data_path>/<dataset_name>/<embedding_crop>/<split>_embeddings.pkl

and each pickle, written by Python 2, holds a dict with

* ``embeddings``: float array ``[n, D]`` (D = 640 for the WRN-28-10 features);
* ``keys``: ``n`` strings ``"<anything>-<class_id>-<image_file>"`` whose image
  file name starts with ``<class_id>_``;
* ``labels``: not needed for episodes, ignored.

`read_embedding_file` turns one file into a `ClassEmbeddings`: one float32
array ``[n_c, D]`` per class id. Every problem with a file is reported at load
time, before any training, as one `DataError` whose message names the file, the
field or class, what was expected and what was found.

Unpickling goes through a restricted unpickler that can only build numpy
arrays, dtypes and scalars and a few builtin values, so a file from an
untrusted source cannot run code.
"""

import dataclasses
import functools
import importlib
import pathlib
import pickle
import types
from typing import Mapping, Sequence

import numpy as np

SPLITS = ("train", "val", "test")
_LAYOUT = "<data_path>/<dataset_name>/<embedding_crop>/<split>_embeddings.pkl"


class DataError(ValueError):
    """A problem with the data: a missing, unreadable or malformed file."""


def split_path(data_path, dataset_name, embedding_crop, split) -> pathlib.Path:
    """The pickle of one split, laid out as `_LAYOUT` says."""
    return (
        pathlib.Path(data_path)
        / str(dataset_name)
        / str(embedding_crop)
        / f"{split}_embeddings.pkl"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ClassEmbeddings:
    """The examples of one split, grouped by class.

    Attributes:
        source: the file path(s) the examples came from, for error messages.
        embeddings: class id -> float32 array `[n_c, D]` (raw, not
            normalised); classes in sorted order, examples in file order.
            `n_c` may differ between classes, `D` may not.
    """

    source: str
    embeddings: Mapping[str, np.ndarray]

    def __post_init__(self):
        if not self.embeddings:
            raise DataError(
                f"{self.source}: expected at least one class, " "found none"
            )
        ordered = {}
        for class_id in sorted(self.embeddings):
            array = np.asarray(self.embeddings[class_id], dtype=np.float32)
            width = next(iter(ordered.values())).shape[1] if ordered else None
            if (
                array.ndim != 2
                or array.shape[0] == 0
                or width not in (None, array.shape[1])
            ):
                expected = f"[n_c, {width}]" if width else "[n_c, D]"
                raise DataError(
                    f"{self.source}: class {class_id!r}: expected a non-empty "
                    f"array {expected}, found shape {array.shape}"
                )
            ordered[class_id] = array
        object.__setattr__(self, "embeddings", types.MappingProxyType(ordered))

    @property
    def class_ids(self) -> tuple:
        return tuple(self.embeddings)

    @property
    def num_classes(self) -> int:
        return len(self.embeddings)

    @property
    def embedding_dim(self) -> int:
        return next(iter(self.embeddings.values())).shape[1]

    @property
    def examples_per_class(self) -> tuple:
        """The number of examples of each class, in `class_ids` order."""
        return tuple(array.shape[0] for array in self.embeddings.values())

    @property
    def min_examples_per_class(self) -> int:
        return min(self.examples_per_class)

    @property
    def num_examples(self) -> int:
        return sum(self.examples_per_class)


# ---------------------------------------------------------------------------
# Restricted unpickling.


@functools.lru_cache(maxsize=None)
def _allowed_globals() -> Mapping:
    """(module, name) -> object, for exactly the globals numpy pickles use.

    Measured on pickles of float, int, byte-string, unicode and object arrays,
    numpy scalars, lists and sets written by Python 2.7 + numpy 1.16
    (protocols 0-2) and by Python 3.11 + numpy 1.26 and 2.4 (protocols 2-5):

    * `numpy.ndarray`, `numpy.dtype`;
    * `<core>.multiarray._reconstruct`, `<core>.multiarray.scalar` (all
      protocols) and `<core>.numeric._frombuffer` (protocol 5), where <core>
      is `numpy.core` (numpy 1) or `numpy._core` (numpy 2);
    * `set` (below protocol 4) and `bytes` (empty bytes at protocol 2), under
      Python 3's module name `builtins` and Python 2's `__builtin__`;
    * `_codecs.encode`, which Python 3 uses for bytes at protocol 2; it is
      admitted only for the latin1 codec, see `_RestrictedUnpickler`.

    Both numpy spellings resolve to the installed numpy's own functions, so a
    numpy 1 pickle loads under numpy 2 without its `numpy.core` deprecation
    warning, and the other way round.
    """
    major = int(np.__version__.split(".")[0])
    core = "numpy._core" if major >= 2 else "numpy.core"
    multiarray = importlib.import_module(f"{core}.multiarray")
    numeric = importlib.import_module(f"{core}.numeric")
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = (
            multiarray._reconstruct
        )  # pylint: disable=protected-access
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = (
            numeric._frombuffer
        )  # pylint: disable=protected-access
    for builtins_module in ("builtins", "__builtin__"):
        allowed[(builtins_module, "set")] = set
        allowed[(builtins_module, "bytes")] = bytes
    return types.MappingProxyType(allowed)


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds numpy arrays and builtin values, refuses every other global."""

    def __init__(self, file, path):
        # latin1 turns Python 2 byte strings into str and keeps numpy's
        # Python 2 array payloads intact.
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return self._encode_latin1
        try:
            return _allowed_globals()[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self._path}: "
                "embedding files hold only numpy arrays, lists and "
                "strings"
            ) from None

    def _encode_latin1(self, text, encoding="utf-8", errors="strict"):
        """`_codecs.encode` for the one use Python 3 makes of it: bytes."""
        if encoding not in ("latin1", "latin-1"):
            raise DataError(
                f"refusing to unpickle _codecs.encode with encoding "
                f"{encoding!r} from {self._path}"
            )
        return str(text).encode("latin1", errors)


# ---------------------------------------------------------------------------
# Reading one file.


def _describe_missing(path: pathlib.Path) -> str:
    """Says that `path` is missing and what is there instead."""

    def listing(directory):
        names = sorted(
            p.name + ("/" if p.is_dir() else "") for p in directory.iterdir()
        )
        if not names:
            return f"{directory} is empty"
        more = f" and {len(names) - 20} more" if len(names) > 20 else ""
        return f"{directory} contains: {', '.join(names[:20])}{more}"

    if path.parent.is_dir():
        return f"{path}: file not found; {listing(path.parent)}"
    ancestor = path.parent
    while not ancestor.is_dir() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    there = listing(ancestor) if ancestor.is_dir() else "no parent exists"
    return (
        f"{path}: file not found: directory {path.parent} does not "
        f"exist; {there}. Expected layout: {_LAYOUT}"
    )


def _unpickle(path: pathlib.Path):
    if not path.is_file():
        if path.exists():
            raise DataError(f"{path}: expected a file, found a directory")
        raise DataError(_describe_missing(path))
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e}") from e
    except Exception as e:  # pylint: disable=broad-except
        # Corrupt, truncated or not a pickle: pickle and numpy raise many
        # types here (UnpicklingError, EOFError, ValueError, TypeError, ...).
        raise DataError(
            f"{path}: expected an embedding pickle, found a corrupt, "
            f"truncated or non-pickle file ({type(e).__name__}: {e})"
        ) from e


def _key_to_str(key):
    """A key as str; byte strings are decoded as latin1, as pickle does."""
    if isinstance(key, (bytes, np.bytes_)):
        return bytes(key).decode("latin1")
    if isinstance(key, (str, np.str_)):
        return str(key)
    return None


@dataclasses.dataclass
class _Rows:
    """The validated rows of one file, before grouping by class."""

    path: pathlib.Path
    embeddings: np.ndarray  # float32 [n, D]
    keys: Sequence[str]  # [n]
    class_ids: Sequence[str]  # [n]
    image_files: Sequence[str]  # [n]


def _read_embeddings_field(path, raw, embedding_dim) -> np.ndarray:
    """`raw["embeddings"]` checked and cast to float32 `[n, D]`."""
    value = raw["embeddings"]
    try:
        array = np.asarray(value)
    except Exception as e:  # pylint: disable=broad-except
        raise DataError(
            f"{path}: field 'embeddings': expected a numeric array [n, D], "
            f"found {type(value).__name__} ({e})"
        ) from e
    if array.dtype.kind not in "fiu":
        raise DataError(
            f"{path}: field 'embeddings': expected a numeric (float) array, "
            f"found dtype {array.dtype}"
        )
    if array.ndim != 2:
        raise DataError(
            f"{path}: field 'embeddings': expected rank 2 [n, D], found rank "
            f"{array.ndim} (shape {array.shape})"
        )
    if embedding_dim is not None and array.shape[1] != embedding_dim:
        raise DataError(
            f"{path}: field 'embeddings': expected width D={embedding_dim}, "
            f"found shape {array.shape}"
        )
    if array.shape[0] == 0:
        raise DataError(
            f"{path}: field 'embeddings': expected at least one row, found "
            f"0 rows (shape {array.shape})"
        )
    with np.errstate(over="ignore"):  # overflow shows up as inf, reported next
        return array.astype(np.float32, copy=False)


def _read_keys_field(path, raw, n) -> list:
    """`raw["keys"]` checked to be `n` strings or byte strings."""
    keys = raw["keys"]
    if isinstance(keys, np.ndarray):
        if keys.ndim != 1:
            raise DataError(
                f"{path}: field 'keys': expected a 1-D array of {n} strings, "
                f"found shape {keys.shape}"
            )
        keys = keys.tolist()
    elif not isinstance(keys, (list, tuple)):
        raise DataError(
            f"{path}: field 'keys': expected an array or list of {n} "
            f"strings, found {type(keys).__name__}"
        )
    if len(keys) != n:
        raise DataError(
            f"{path}: field 'keys': expected one key per row of field "
            f"'embeddings' ({n}), found {len(keys)} keys"
        )
    return keys


def _parse_key(path, index, key):
    """`"<anything>-<class_id>-<image_file>"` -> (key, class_id, image_file)."""
    text = _key_to_str(key)
    if text is None:
        raise DataError(
            f"{path}: field 'keys': row {index}: expected a string, found "
            f"{type(key).__name__} {key!r}"
        )
    fields = text.split("-")
    if len(fields) != 3:
        raise DataError(
            f"{path}: field 'keys': malformed key {text!r} at row {index}: "
            "expected 3 '-'-separated fields "
            f"'<prefix>-<class_id>-<image_file>', found {len(fields)}"
        )
    _, class_id, image_file = fields
    file_prefix = image_file.split("_")[0]
    if not class_id or file_prefix != class_id:
        raise DataError(
            f"{path}: field 'keys': malformed key {text!r} at row {index}: "
            f"expected a non-empty class id that the image file name repeats "
            f"before its first '_', found class id {class_id!r} and file "
            f"name prefix {file_prefix!r}"
        )
    return text, class_id, image_file


def _read_rows(path, embedding_dim) -> _Rows:
    """Unpickles one file and validates every field; see `read_embedding_file`."""
    path = pathlib.Path(path)
    raw = _unpickle(path)
    if not isinstance(raw, dict):
        raise DataError(
            f"{path}: expected a dict with fields 'embeddings' and 'keys' at "
            f"the top level, found {type(raw).__name__}"
        )
    for field in ("embeddings", "keys"):
        if field not in raw:
            raise DataError(
                f"{path}: missing field {field!r}: expected fields "
                f"'embeddings' and 'keys', found {sorted(map(str, raw))}"
            )
    embeddings = _read_embeddings_field(path, raw, embedding_dim)
    keys = _read_keys_field(path, raw, len(embeddings))

    finite = np.isfinite(embeddings)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        first = int(bad_rows[0])
        raise DataError(
            f"{path}: field 'embeddings': expected finite float32 values, "
            f"found {int(finite.size - finite.sum())} non-finite values in "
            f"{len(bad_rows)} rows, the first at row {first} "
            f"(key {_key_to_str(keys[first]) or keys[first]!r})"
        )

    parsed = [_parse_key(path, i, key) for i, key in enumerate(keys)]
    texts, class_ids, image_files = zip(*parsed)
    return _Rows(path, embeddings, texts, class_ids, image_files)


def _group_by_class(files: Sequence[_Rows]) -> ClassEmbeddings:
    """Groups the validated rows of one or more files by class id."""
    source = " + ".join(str(f.path) for f in files)
    widths = [f.embeddings.shape[1] for f in files]
    if len(set(widths)) > 1:
        raise DataError(
            f"{source}: field 'embeddings': expected the same width D in "
            f"every file, found {widths}"
        )

    # The authors index examples by image file name, so a name seen twice
    # would silently drop an example: it is an error.
    seen = {}  # image file -> (file, row)
    for f in files:
        for row, image_file in enumerate(f.image_files):
            if image_file in seen:
                first_file, first_row = seen[image_file]
                raise DataError(
                    f"{f.path}: field 'keys': duplicate image file "
                    f"{image_file!r}: key {f.keys[row]!r} at row {row} "
                    f"repeats key {first_file.keys[first_row]!r} at row "
                    f"{first_row} of {first_file.path}"
                )
            seen[image_file] = (f, row)

    embeddings = np.concatenate([f.embeddings for f in files], axis=0)
    row_class_ids = np.array([c for f in files for c in f.class_ids])
    names, row_class = np.unique(row_class_ids, return_inverse=True)
    order = np.argsort(row_class, kind="stable")  # keeps file order
    counts = np.bincount(row_class, minlength=len(names))
    grouped = np.split(embeddings[order], np.cumsum(counts)[:-1])
    return ClassEmbeddings(source=source, embeddings=dict(zip(names.tolist(), grouped)))


def read_embedding_file(path, embedding_dim: int | None = 640) -> ClassEmbeddings:
    """Reads and validates one embedding pickle.

    Args:
        path: the `.pkl` file.
        embedding_dim: the expected width D of `embeddings`; None accepts any.

    Returns:
        `ClassEmbeddings`: one float32 array `[n_c, D]` per class id.

    Raises:
        DataError: the file is missing or unreadable, is not a pickle, refers
            to anything but numpy arrays and builtin values, or has a missing
            or malformed field.
    """
    return _group_by_class([_read_rows(path, embedding_dim)])


def load_split(
    data_path,
    dataset_name,
    embedding_crop,
    split,
    *,
    train_on_val=False,
    embedding_dim=640,
) -> ClassEmbeddings:
    """Reads one split of a data set; with `train_on_val`, train + val.

    Args:
        data_path: the folder holding `<dataset_name>/<embedding_crop>/`.
        dataset_name: "miniImageNet", "tieredImageNet", "synthetic", ...
        embedding_crop: "center" or "multiview".
        split: "train", "val" or "test".
        train_on_val: for split "train", also read the val examples, as the
            authors do; ignored for the other splits.
        embedding_dim: the expected width D; None accepts any.

    Returns:
        `ClassEmbeddings`: one float32 array `[n_c, D]` per class id.
    """
    if split not in SPLITS:
        raise DataError(f"split: expected one of {SPLITS}, found {split!r}")
    splits = ("train", "val") if split == "train" and train_on_val else (split,)
    return _group_by_class(
        [
            _read_rows(
                split_path(data_path, dataset_name, embedding_crop, s), embedding_dim
            )
            for s in splits
        ]
    )


def check_episode_requirements(
    classes: ClassEmbeddings, *, num_classes: int, examples_per_class: int, split: str
) -> None:
    """Checks that `classes` can supply N-way episodes.

    Args:
        classes: the split's examples.
        num_classes: N, the distinct classes in an episode.
        examples_per_class: the distinct examples an episode draws from each
            of its classes (support + query).
        split: the split's name, for the message ("" to leave it out).

    Raises:
        DataError: fewer than N classes, or a class with fewer examples than
            an episode draws; the message names the smallest classes.
    """
    where = f"{classes.source}: split {split!r}" if split else classes.source
    if classes.num_classes < num_classes:
        raise DataError(
            f"{where}: expected at least {num_classes} classes for "
            f"{num_classes}-way episodes, found {classes.num_classes}"
        )
    small = sorted(
        (count, class_id)
        for class_id, count in zip(classes.class_ids, classes.examples_per_class)
        if count < examples_per_class
    )
    if small:
        shown = ", ".join(
            f"class {class_id!r} has {count}" for count, class_id in small[:5]
        )
        more = f", and {len(small) - 5} more" if len(small) > 5 else ""
        raise DataError(
            f"{where}: expected at least {examples_per_class} examples in "
            f"every class (support + query of one episode), found "
            f"{len(small)} smaller classes: {shown}{more}"
        )


__all__ = [
    "ClassEmbeddings",
    "DataError",
    "SPLITS",
    "check_episode_requirements",
    "load_split",
    "read_embedding_file",
    "split_path",
]
