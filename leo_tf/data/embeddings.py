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
import os
import pathlib
import pickle
import stat
import types
from typing import Mapping, Sequence

import numpy as np

from leo_tf import file_kinds

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
def _numpy_scalar():
    """numpy's `<core>.multiarray.scalar`, which builds a pickled scalar."""
    major = int(np.__version__.split(".")[0])
    core = "numpy._core" if major >= 2 else "numpy.core"
    return importlib.import_module(f"{core}.multiarray").scalar


# The globals numpy pickles use, measured on pickles of float, int,
# byte-string, unicode and object arrays, numpy scalars, lists and sets
# written by Python 2.7 + numpy 1.16 (protocols 0-2) and by Python 3.11 +
# numpy 1.26 and 2.4 (protocols 2-5):
#
# * `numpy.ndarray`, `numpy.dtype`;
# * `<core>.multiarray._reconstruct`, `<core>.multiarray.scalar` (all
#   protocols) and `<core>.numeric._frombuffer` (protocol 5), where <core> is
#   `numpy.core` (numpy 1) or `numpy._core` (numpy 2); both spellings are
#   served by the installed numpy, so a numpy 1 pickle loads under numpy 2
#   and the other way round;
# * `set` (below protocol 4) and `bytes` (empty bytes at protocol 2), under
#   Python 3's module name `builtins` and Python 2's `__builtin__`;
# * `_codecs.encode`, which Python 3 uses for bytes at protocol 2.
#
# `_RestrictedUnpickler.find_class` maps each to what builds it here.
_NUMPY_CORE_PACKAGES = ("numpy.core", "numpy._core")
_BUILTINS_MODULES = ("builtins", "__builtin__")


class _PickledArray:
    """A numpy array as a pickle declares it, not yet built.

    The unpickler makes one of these wherever numpy would build an array
    (`numpy.ndarray(...)`, `_reconstruct` + `__setstate__`, `_frombuffer`),
    so that the declared shape and dtype can be checked against the data the
    file really holds before anything of that size is allocated: a pickle of a
    hundred bytes can declare an array of any size. `build` checks and builds.
    """

    def __init__(self, shape=(0,), dtype="b", data=None, order="C"):
        self.shape, self.dtype, self.data, self.order = shape, dtype, data, order
        self.fortran = order == "F"
        self.buffer = False  # True: `data` is the raw buffer of `_frombuffer`

    @classmethod
    def reconstruct(cls, subtype, shape, dtype):
        """numpy's `_reconstruct(ndarray, shape, dtype)`."""
        if subtype is not cls:
            raise pickle.UnpicklingError(f"{subtype!r} is not numpy.ndarray")
        return cls(shape, dtype)

    @classmethod
    def frombuffer(cls, buffer, dtype, shape, order):
        """numpy's `_frombuffer`, pickle protocol 5's form of an array."""
        array = cls(shape, dtype, buffer, order)
        array.buffer = True
        return array

    def __setstate__(self, state):
        """numpy's `ndarray.__setstate__`: `([version,] shape, dtype,
        is_fortran, rawdata)`, kept as it is until `build`."""
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError(
                f"malformed numpy array state: expected a tuple ([version,] "
                f"shape, dtype, is_fortran, data), found {_short_repr(state)}"
            )
        self.shape, self.dtype, self.fortran, self.data = state[-4:]
        self.buffer = False

    def __repr__(self):
        return f"<numpy array shape={self.shape!r} dtype={self.dtype!r}>"

    def build(self, path, field, file_size) -> np.ndarray:
        """The array, once its declared size is known to match its data.

        Args:
          path, field: the file and its field, for messages.
          file_size: the file's size in bytes, an upper bound on the
            number of elements (dtypes of 0 bytes hold none).

        Raises:
          DataError: naming `path` and `field`, when the shape or dtype is
            malformed or the declared size differs from the data present.
        """
        where = f"{path}: field {field!r}"
        shape = _declared_shape(where, self.shape)
        dtype = _declared_dtype(where, self.dtype)
        count = int(np.prod(shape, dtype=object))
        nbytes = count * dtype.itemsize
        declared = (
            f"declares an array of shape {shape} and dtype {dtype} ({nbytes} bytes)"
        )
        if dtype.hasobject:
            present = len(self.data) if isinstance(self.data, list) else None
            if present != count:
                raise DataError(
                    f"{where}: {declared}, {count} Python objects, but the file "
                    f"holds {'no list' if present is None else present} of "
                    "them for it: the file is corrupt"
                )
        else:
            present = _data_size(self.data)
            if present != nbytes:
                raise DataError(
                    f"{where}: {declared}, but the file holds "
                    f"{'no' if present is None else present} bytes of data for "
                    f"it (the whole file is {file_size} bytes): the file is "
                    "corrupt or truncated"
                )
        if count > file_size:
            raise DataError(
                f"{where}: {declared}, {count} elements, more than its file of "
                f"{file_size} bytes can describe: the file is corrupt"
            )
        try:
            if self.buffer:
                return np.frombuffer(self.data, dtype).reshape(shape, order=self.order)
            array = np.ndarray((0,), np.int8)
            array.__setstate__((1, shape, dtype, bool(self.fortran), self.data))
            return array
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}: malformed numpy array ({e})") from e


def _short_repr(value, limit=60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _declared_shape(where, shape) -> tuple:
    if not isinstance(shape, tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise DataError(
            f"{where}: malformed numpy array: expected a shape of non-negative "
            f"integers, found {_short_repr(shape)}"
        )
    return shape


def _declared_dtype(where, dtype) -> np.dtype:
    if isinstance(dtype, np.dtype):
        return dtype
    try:
        return np.dtype(dtype.decode("latin1") if isinstance(dtype, bytes) else dtype)
    except (TypeError, ValueError, AttributeError) as e:
        raise DataError(
            f"{where}: malformed numpy array: expected a dtype, found "
            f"{_short_repr(dtype)}"
        ) from e


def _data_size(data):
    """Bytes in an array's pickled data: bytes, latin1 text (Python 2) or a
    buffer; None for anything else."""
    if isinstance(data, str):
        return len(data)
    try:
        return memoryview(data).nbytes
    except TypeError:
        return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds builtin values, numpy scalars and dtypes, and `_PickledArray`s
    where numpy arrays are declared; refuses every other global.

    Whatever it allocates while loading is bounded by the file's size:
    arrays wait in `_PickledArray`s, `bytes(n)` is refused, and the bytes
    made by `_codecs.encode` and numpy scalars together may not exceed
    `_ALLOWANCE_PER_FILE_BYTE` times the file's size, so references to one
    big string cannot multiply it.
    """

    # Each byte of data in a file is decoded at most once (`_codecs.encode`)
    # and copied at most once (into a numpy scalar).
    _ALLOWANCE_PER_FILE_BYTE = 2

    def __init__(self, file, path, file_size):
        # latin1 turns Python 2 byte strings into str and keeps numpy's
        # Python 2 array payloads intact.
        super().__init__(file, encoding="latin1")
        self._path = path
        self._file_size = file_size
        self._allowance = self._ALLOWANCE_PER_FILE_BYTE * file_size
        self._globals = self._allowed_globals()

    def _allowed_globals(self) -> dict:
        """(module, name) -> what builds it, for the globals listed above."""
        allowed = {
            ("numpy", "ndarray"): _PickledArray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): self._encode_latin1,
        }
        for package in _NUMPY_CORE_PACKAGES:
            allowed[(f"{package}.multiarray", "_reconstruct")] = (
                _PickledArray.reconstruct
            )
            allowed[(f"{package}.multiarray", "scalar")] = self._scalar
            allowed[(f"{package}.numeric", "_frombuffer")] = _PickledArray.frombuffer
        for builtins_module in _BUILTINS_MODULES:
            allowed[(builtins_module, "set")] = set
            allowed[(builtins_module, "bytes")] = self._empty_bytes
        return allowed

    def find_class(self, module, name):
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self._path}: "
                "embedding files hold only numpy arrays, lists and "
                "strings"
            ) from None

    def _take(self, nbytes, what):
        """Charges `nbytes` about to be allocated for `what` to the file."""
        if nbytes > self._allowance:
            raise DataError(
                f"{self._path}: {what} declares {nbytes} bytes, more than the "
                f"file's {self._file_size} bytes can hold: the file is corrupt"
            )
        self._allowance -= nbytes

    def _encode_latin1(self, text, encoding="utf-8", errors="strict"):
        """`_codecs.encode` for the one use Python 3 makes of it: bytes."""
        if encoding not in ("latin1", "latin-1"):
            raise DataError(
                f"refusing to unpickle _codecs.encode with encoding "
                f"{encoding!r} from {self._path}"
            )
        text = str(text)
        self._take(len(text), "a byte string")
        return text.encode("latin1", errors)

    def _scalar(self, dtype, *data):
        """numpy's `multiarray.scalar(dtype[, data])`: one numpy value."""
        if isinstance(dtype, np.dtype):
            self._take(dtype.itemsize, f"a numpy {dtype} scalar")
        return _numpy_scalar()(dtype, *data)

    def _empty_bytes(self, *args):
        """`bytes()`: Python 3 pickles empty bytes so below protocol 3."""
        if args:
            raise DataError(
                f"refusing to unpickle bytes{_short_repr(args)} from "
                f"{self._path}: only empty bytes are pickled that way"
            )
        return b""


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


def not_a_file_problem(path) -> str | None:
    """What keeps an existing `path` from being read as a file, or None.

    Looks only at `os.stat`, so a FIFO or a device is never opened (opening a
    FIFO blocks until someone writes to it).

    Returns:
      None for a regular file (or a link to one); else e.g. "expected a
      file, found a FIFO (named pipe)" or "expected a file, found a broken
      symbolic link to 'target'".
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return (
                "expected a file, found a broken symbolic link to "
                f"{os.readlink(path)!r}"
            )
        return "file not found"
    except OSError as e:  # a loop of links, a path through a file, ...
        return f"cannot read the file: {e.strerror}"
    if stat.S_ISREG(mode):
        return None
    return f"expected a file, found {file_kinds.kind_of_mode(mode)}"


def _unpickle(path: pathlib.Path):
    """The pickled value of `path`, arrays as `_PickledArray`s, and the
    file's size in bytes."""
    if not os.path.lexists(path):
        raise DataError(_describe_missing(path))
    problem = not_a_file_problem(path)
    if problem:
        raise DataError(f"{path}: {problem}")
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            return _RestrictedUnpickler(f, path, file_size).load(), file_size
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


def _read_embeddings_field(path, value, embedding_dim) -> np.ndarray:
    """The field 'embeddings' checked and cast to float32 `[n, D]`."""
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


def _read_keys_field(path, keys, n) -> list:
    """The field 'keys' checked to be `n` strings or byte strings."""
    if isinstance(keys, np.ndarray):
        if keys.ndim != 1:
            raise DataError(
                f"{path}: field 'keys': expected a 1-D array of {n} strings, "
                f"found shape {keys.shape}"
            )
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
    return keys.tolist() if isinstance(keys, np.ndarray) else keys


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


def _built(path, raw, field, file_size):
    """`raw[field]`, an array built only now that its size is checked."""
    value = raw[field]
    if isinstance(value, _PickledArray):
        return value.build(path, field, file_size)
    if isinstance(value, (list, tuple)):
        _check_list_size(path, field, value, file_size)
    return value


def _check_list_size(path, field, rows, file_size):
    """Raises DataError if the list `rows` holds more values than its file
    has bytes: its rows are then references to the same few objects, and an
    array built from it would need memory far beyond the file's size."""
    count = sum(len(row) if hasattr(row, "__len__") else 1 for row in rows)
    if count > file_size:
        raise DataError(
            f"{path}: field {field!r}: a list of {len(rows)} rows holding "
            f"{count} values in all, more than the file's {file_size} bytes "
            "could store (its rows repeat references to the same objects); "
            "refusing to build it"
        )


def _read_rows(path, embedding_dim) -> _Rows:
    """Unpickles one file and validates every field; see `read_embedding_file`."""
    path = pathlib.Path(path)
    raw, file_size = _unpickle(path)
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
    embeddings = _read_embeddings_field(
        path, _built(path, raw, "embeddings", file_size), embedding_dim
    )
    keys = _read_keys_field(path, _built(path, raw, "keys", file_size), len(embeddings))

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


def read_rows(path) -> tuple:
    """Reads and validates one pickle's rows, without grouping them by class.

    Cheaper than `read_embedding_file` for a large file (no copy of the
    embeddings), for callers that only need each row and its class; it
    does not look for duplicate image file names.

    Returns:
      (class ids str `[n]`, embeddings float32 `[n, D]`), in file order.
    """
    rows = _read_rows(path, embedding_dim=None)
    return np.array(rows.class_ids), rows.embeddings


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
    "read_rows",
    "split_path",
]
