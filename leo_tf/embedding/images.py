"""Image sources -> `ImageSet` (images uint8 [n, H, W, C] + class names [n]).

Three sources, all ending in the same in-memory form:

* `load_packed_omniglot`: the packed Omniglot arrays (`omniglot_28.npz`:
    images uint8 [n, 28, 28] and per-row char_id, drawing, alphabet and
    character). Class name `"<alphabet>/<character>"`, group
    `<alphabet>`; rows sorted by class name, then drawing.
* `load_image_folder`: a directory of image files read with TFDS'
    `tfds.folder_dataset.ImageFolder`. Two layouts:
      - `"class"`: DIR/<class>/<image>.png (class name `<class>`);
      - `"group/class"`: DIR/<group>/<class>/<image>.png (class name
        `"<group>/<class>"`, e.g. Omniglot's `<alphabet>/<character>`).
    ImageFolder wants `root/<split>/<label>/<image>`; the "group/class" layout
    is read with the groups as its splits, the "class" layout through a
    temporary root whose only split is a symbolic link to DIR. Rows are sorted
    by class name, then file name (ImageFolder shuffles them; we sort back).
* `load_tfds`: a registered TFDS data set by name, its chosen splits pooled
    (classes are re-split at the class level later). Class names come from the
    `label` ClassLabel names; for Omniglot the `alphabet` feature is the group.

Every source applies the same per-image conversion, `convert_images`
(optional channel conversion, then optional square resize), so the same
pixels give the same arrays whatever the source.
"""

import collections
import contextlib
import dataclasses
import difflib
import logging
import os
import tempfile
import zipfile
import zlib
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from leo_tf import error_text, file_kinds, memory
from leo_tf.data import embeddings as embeddings_lib
from leo_tf.embedding.options import FOLDER_LAYOUTS

# TFDS data sets whose examples carry a class-group feature (e.g. alphabet).
_TFDS_GROUP_FEATURE = {"omniglot": "alphabet"}

# Keys of the packed Omniglot file that are read here.
_PACKED_KEYS = ("images", "char_id", "drawing", "alphabet", "character")


class ImageSourceError(ValueError):
    """An image source is missing, malformed, or inconsistent."""


def check_memory(num_bytes, what, remedy, available=None):
    """ImageSourceError unless `num_bytes`, what `what` (e.g. "--image_size=
    4000: the 32460 images at 4000x4000") needs, fit in the memory available:
    `available` ((bytes, source)), by default `memory.available_memory()`.
    `remedy` ends the message."""
    limit, source = available or memory.available_memory()
    if num_bytes > limit:
        raise ImageSourceError(
            f"{what} need about {num_bytes / 2**30:.1f} GiB of memory, more "
            f"than the {limit / 2**30:.1f} GiB available ({source}); {remedy}"
        )


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Labelled images from one source.

    Attributes:
      images: uint8 [n, H, W, C].
      class_names: str [n], the class of each image (unique class identity).
      groups: str [n], a coarser grouping of classes (Omniglot: the alphabet);
        "" where the source has none. Every class lies in exactly one group.
    """

    images: np.ndarray
    class_names: np.ndarray
    groups: np.ndarray

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ImageSourceError(
                f"images: expected uint8 [n, H, W, C], found {self.images.dtype} "
                f"{self.images.shape}"
            )
        n = self.images.shape[0]
        for name in ("class_names", "groups"):
            value = getattr(self, name)
            if value.shape != (n,):
                raise ImageSourceError(
                    f"{name}: expected shape ({n},), found {value.shape}"
                )

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    def take(self, rows: np.ndarray) -> "ImageSet":
        """The rows `rows` (int [m]) of this set, in that order."""
        return ImageSet(self.images[rows], self.class_names[rows], self.groups[rows])


def concatenate(parts: Sequence[ImageSet]) -> ImageSet:
    """One ImageSet holding the rows of `parts` in order (shapes must agree)."""
    shapes = {p.images.shape[1:] for p in parts}
    if len(shapes) != 1:
        raise ImageSourceError(
            f"images of different shapes {sorted(shapes)}: set --image_size "
            "and --channels to convert them to one shape"
        )
    return ImageSet(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.class_names for p in parts]).astype(str),
        np.concatenate([p.groups for p in parts]).astype(str),
    )


def convert_images(
    images: tf.Tensor, image_size: int = 0, channels: int = 0
) -> tf.Tensor:
    """Converts images to `channels` channels and `image_size`^2 pixels.

    Args:
      images: uint8 [..., H, W, C] (one image or a batch).
      image_size: side of the square output; 0 keeps H and W. Resizing is
        bilinear with antialiasing, rounded back to uint8.
      channels: 1 or 3; 0 keeps C. 3 -> 1 uses the ITU-R 601 luma weights,
        1 -> 3 repeats the grey channel.

    Returns:
      uint8 [..., S, S, channels] (S = image_size, or H, W when 0).
    """
    images = tf.convert_to_tensor(images)
    source_channels = images.shape[-1]
    if channels not in (0, source_channels):
        if source_channels == 3 and channels == 1:
            weights = tf.constant([0.299, 0.587, 0.114], tf.float32)
            grey = tf.reduce_sum(
                tf.cast(images, tf.float32) * weights, axis=-1, keepdims=True
            )
            images = tf.cast(tf.clip_by_value(tf.round(grey), 0, 255), tf.uint8)
        elif source_channels == 1 and channels == 3:
            images = tf.repeat(images, 3, axis=-1)
        else:
            raise ImageSourceError(
                f"cannot convert {source_channels}-channel images to {channels}"
            )
    if image_size:
        height, width = images.shape[-3], images.shape[-2]
        if (height, width) != (image_size, image_size):
            resized = tf.image.resize(
                tf.cast(images, tf.float32),
                (image_size, image_size),
                method="bilinear",
                antialias=True,
            )
            images = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    return images


def load_packed_omniglot(path: str, image_size: int = 0, channels: int = 0) -> ImageSet:
    """Reads the packed Omniglot arrays (`omniglot_28.npz`).

    Args:
      path: the .npz file: images uint8 [n, 28, 28], char_id, drawing,
        alphabet, character per row.
      image_size, channels: see `convert_images` (the file is 1-channel).

    Returns:
      ImageSet with images uint8 [n, S, S, C], class names
      "<alphabet>/<character>", groups "<alphabet>"; rows ordered by class name,
      then drawing (the same order as `load_image_folder` on the original PNGs,
      whose file names sort in drawing order).

    Raises:
      ImageSourceError: naming the file and the key, for a file that is not
        a readable .npz of the arrays above (see `read_packed_arrays`).
    """
    arrays = read_packed_arrays(path)
    images = arrays["images"]
    alphabets = arrays["alphabet"].astype(str)
    class_names = np.char.add(
        np.char.add(alphabets, "/"), arrays["character"].astype(str)
    )
    order = np.lexsort((arrays["drawing"], class_names))
    alphabets, class_names = alphabets[order], class_names[order]
    if image_size:
        # The result, and the float32 intermediates of one chunk (4 alive).
        pixels = image_size**2 * (channels or 1)
        check_memory(
            pixels * (len(images) + 16 * min(len(images), _CONVERSION_CHUNK)),
            f"--image_size={image_size}: the {len(images)} images at "
            f"{image_size}x{image_size}",
            "lower --image_size",
        )
    converted = _convert_in_chunks(images[order][..., None], image_size, channels)
    return ImageSet(converted, class_names, alphabets)


# Images converted at once by `_convert_in_chunks`.
_CONVERSION_CHUNK = 1024


def _convert_in_chunks(images, image_size, channels):
    """convert_images of uint8 [n, H, W, C] -> [n, S, S, C'], a chunk of
    images at a time, so that its float32 intermediates stay chunk-sized
    (each image is converted alone, so the result is the same)."""
    chunks = range(0, len(images), _CONVERSION_CHUNK)
    converted = None
    for start in chunks:
        chunk = images[start : start + _CONVERSION_CHUNK]
        result = convert_images(chunk, image_size, channels).numpy()
        if converted is None:
            converted = np.empty((len(images), *result.shape[1:]), np.uint8)
        converted[start : start + len(result)] = result
    return converted


def read_packed_arrays(path: str) -> dict:
    """The arrays `_PACKED_KEYS` of a packed Omniglot .npz, validated.

    The file is read as the zip archive of .npy files it is, with the same
    care as the embedding pickles: each array's header is checked (no
    Python objects, the dtype and rank `_PACKED_ARRAYS` gives, a declared
    size that its stored bytes can hold) before its data are read, and all
    arrays must have one row per image.

    Returns:
      {key: array} with images uint8 [n, H, W] and the others [n].

    Raises:
      ImageSourceError: naming the file, and the key where one is at fault.
    """
    if not os.path.lexists(path):
        raise ImageSourceError(f"--packed_omniglot: no such file {path!r}")
    problem = embeddings_lib.not_a_file_problem(path)
    if problem:
        raise ImageSourceError(f"--packed_omniglot={path}: {problem}")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {
                name[: -len(".npy")]: archive.getinfo(name)
                for name in archive.namelist()
                if name.endswith(".npy")
            }
            missing = [k for k in _PACKED_KEYS if k not in members]
            if missing:
                raise ImageSourceError(
                    f"{path}: missing keys {missing}; expected "
                    f"{list(_PACKED_KEYS)}, found {sorted(members)}"
                )
            arrays = {
                key: _read_packed_array(path, archive, key, members[key])
                for key in _PACKED_KEYS
            }
    except zipfile.BadZipFile as error:
        with open(path, "rb") as file:
            zip_like = file.read(4) == b"PK\x03\x04"
        found = (
            f"a damaged or truncated zip archive ({error})"
            if zip_like
            else "a file that is not a zip archive"
        )
        raise ImageSourceError(
            f"{path}: expected a .npz file (numpy.savez: a zip archive of .npy "
            f"arrays), found {found}"
        ) from error
    except OSError as error:
        raise ImageSourceError(f"{path}: cannot read the file: {error}") from error
    rows = len(arrays["images"])
    for key, array in arrays.items():
        if len(array) != rows:
            raise ImageSourceError(
                f"{path}: key {key!r}: expected one value per image of key "
                f"'images' ({rows}), found {len(array)}"
            )
    if rows == 0:
        raise ImageSourceError(f"{path}: key 'images': expected images, found none")
    return arrays


# Each packed array: its rank, what it must hold, and a test of its dtype.
_PACKED_ARRAYS = {
    "images": (3, "uint8 [n, H, W]", lambda dtype: dtype == np.uint8),
    "char_id": (1, "integers [n]", lambda dtype: dtype.kind in "iu"),
    "drawing": (1, "integers [n]", lambda dtype: dtype.kind in "iu"),
    "alphabet": (1, "strings [n]", lambda dtype: dtype.kind in "US"),
    "character": (1, "strings [n]", lambda dtype: dtype.kind in "US"),
}
# The most a deflated stream can expand (zlib's "technical details": 1032:1).
_MAX_DEFLATE_RATIO = 1032
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _read_packed_array(path, archive, key, member) -> np.ndarray:
    """One .npy member of the archive; its data are read only once its
    header is known to describe an array of `_PACKED_ARRAYS[key]` whose size
    the member holds."""
    where = f"{path}: key {key!r}"
    try:
        with archive.open(member) as file:
            shape, fortran_order, dtype = _read_npy_header(where, file)
            _check_packed_header(where, key, shape, dtype)
            nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
            stored = member.file_size - file.tell()
            _check_declared_size(
                where, member, f"{dtype} {list(shape)}", nbytes, stored
            )
            data = file.read(nbytes)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise ImageSourceError(
            f"{where}: cannot read it ({error}): the file is corrupt or truncated"
        ) from error
    if len(data) != nbytes:
        raise ImageSourceError(
            f"{where}: expected {nbytes} bytes of data, found {len(data)}: the "
            "file is truncated"
        )
    order = "F" if fortran_order else "C"
    return np.frombuffer(data, dtype).reshape(shape, order=order)


def _read_npy_header(where, file):
    """(shape, fortran_order, dtype) from the header of a .npy file."""
    try:
        version = np.lib.format.read_magic(file)
        return _NPY_HEADER_READERS[version](file)
    except (KeyError, ValueError) as error:
        raise ImageSourceError(
            f"{where}: expected a .npy array, found a malformed or unsupported "
            f"header ({error})"
        ) from error


def _check_packed_header(where, key, shape, dtype):
    rank, expected, dtype_ok = _PACKED_ARRAYS[key]
    if dtype.hasobject:
        raise ImageSourceError(
            f"{where}: expected {expected}, found an array of Python objects "
            "(dtype object), which only unpickling could read: refused"
        )
    if len(shape) != rank or not dtype_ok(dtype):
        raise ImageSourceError(
            f"{where}: expected {expected}, found {dtype} {list(shape)}"
        )


def _check_declared_size(where, member, declared, nbytes, stored):
    """Refuses a member whose header or zip entry declares more data than
    it holds, before anything of that size is allocated."""
    expandable = member.compress_size * (
        _MAX_DEFLATE_RATIO if member.compress_type == zipfile.ZIP_DEFLATED else 1
    )
    if member.file_size > expandable:
        raise ImageSourceError(
            f"{where}: its zip entry declares {member.file_size} bytes, more "
            f"than its {member.compress_size} stored bytes can hold: the file "
            "is corrupt"
        )
    if nbytes != stored:
        raise ImageSourceError(
            f"{where}: declares {declared} ({nbytes} bytes of data), but its .npy "
            f"member holds {stored} bytes of data: the file is corrupt or truncated"
        )


def _read_examples(
    dataset: tf.data.Dataset,
    features: Sequence[str],
    image_size: int,
    channels: int,
    description: str,
):
    """Iterates `dataset` once, converting each "image" (see convert_images).

    `description` names the data in error messages.

    Returns:
      (images uint8 [n, S, S, C], {feature: np.ndarray [n]} for `features`).
    """

    def convert(example):
        out = {key: example[key] for key in features}
        out["image"] = convert_images(example["image"], image_size, channels)
        return out

    images, values = [], {key: [] for key in features}
    held, available = 0, memory.available_memory()
    for example in dataset.map(convert).as_numpy_iterator():
        images.append(example["image"])
        for key in features:
            values[key].append(example[key])
        held += example["image"].nbytes
        if 2 * held > available[0]:
            _refuse_read_images(images, held, image_size, description, available)
    if not images:
        raise ImageSourceError(f"{description}: no examples")
    sizes = collections.Counter(image.shape[:2] for image in images)
    if len(sizes) > 1:
        shown = ", ".join(
            f"{count} of {h}x{w}" for (h, w), count in sizes.most_common(4)
        )
        raise ImageSourceError(
            f"{description}: images of {len(sizes)} sizes ({shown}"
            f"{', ...' if len(sizes) > 4 else ''}); pass --image_size to resize "
            "them all to one size"
        )
    return np.stack(images).astype(np.uint8), {
        key: np.array(value) for key, value in values.items()
    }


def _refuse_read_images(images, held, image_size, description, available):
    """ImageSourceError, naming --image_size: the images read so far (`held`
    bytes) and the array they would be stacked into do not fit."""
    height, width = images[-1].shape[:2]
    flag = f"--image_size={image_size}: " if image_size else ""
    check_memory(
        2 * held,
        f"{description}: {flag}the first {len(images)} images (the last "
        f"{height}x{width}) and their stacked copy",
        "lower --image_size" if image_size else "pass --image_size to shrink them",
        available,
    )


# The image files TFDS' ImageFolder reads (by suffix, in any case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _undecodable(directory: str, error: Exception) -> ImageSourceError:
    """ImageSourceError naming the first image file under `directory` (in
    path order) that TensorFlow cannot decode as one still image: what made
    reading the folder fail with `error`, whose message names no file. (A
    GIF, whatever its name, decodes as a stack of frames.)"""
    for root, folders, files in os.walk(directory, followlinks=True):
        folders.sort()
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = os.path.join(root, name)
            try:
                image = tf.io.decode_image(tf.io.read_file(path))
            except tf.errors.OpError as problem:
                reason = error_text.summary(problem)
                return ImageSourceError(
                    f"--image_dir={directory}: cannot decode {path}: {reason}"
                )
            if image.shape.rank != 3:
                return ImageSourceError(
                    f"--image_dir={directory}: {path} is a GIF (frames "
                    f"{list(image.shape)}), not a still image: save it as a PNG "
                    "or JPEG"
                )
    return ImageSourceError(
        f"--image_dir={directory}: an image could not be decoded: "
        f"{error_text.summary(error)}"
    )


def _names(values: np.ndarray, names: Optional[Sequence[str]]) -> np.ndarray:
    """str [n]: names[v] for each int value v, or str(v) when names is None."""
    if names is None:
        return np.array([str(v) for v in values], dtype=str)
    return np.array([names[v] for v in values], dtype=str)


def dataset_to_image_set(
    dataset: tf.data.Dataset,
    label_names: Optional[Sequence[str]] = None,
    group_feature: Optional[str] = None,
    group_names: Optional[Sequence[str]] = None,
    image_size: int = 0,
    channels: int = 0,
    description: str = "data set",
) -> ImageSet:
    """Reads a tf.data of {"image", "label"[, group_feature]} into arrays.

    Args:
      dataset: elements {"image": uint8 [H, W, C], "label": int64 [],
        group_feature: int64 []} (extra features are ignored).
      label_names: class name of each label value; None uses str(label).
      group_feature: name of an int feature naming each example's group, or
        None for no groups.
      group_names: name of each group value; None uses str(value).
      image_size, channels: see `convert_images`, applied per example.
      description: names the data in error messages.

    Returns:
      ImageSet in the dataset's order.
    """
    features = ["label"] + ([group_feature] if group_feature else [])
    images, values = _read_examples(
        dataset, features, image_size, channels, description
    )
    class_names = _names(values["label"], label_names)
    if group_feature:
        groups = _names(values[group_feature], group_names)
    else:
        groups = np.full(len(class_names), "", dtype=str)
    return ImageSet(images, class_names, groups)


@contextlib.contextmanager
def _without_tfds_litter():
    """Points Python's temp dir at a folder removed on exit.

    Around a TFDS builder's construction: a builder whose data set is not
    prepared makes a folder under the temp dir (its DatasetInfo's
    `initialize_from_bucket`) and never removes it.
    """
    with tempfile.TemporaryDirectory() as scratch:
        previous = tempfile.tempdir
        tempfile.tempdir = scratch
        try:
            yield
        finally:
            tempfile.tempdir = previous


def load_tfds(
    name: str,
    splits: Sequence[str],
    data_dir: Optional[str] = None,
    download: bool = True,
    image_size: int = 0,
    channels: int = 0,
) -> ImageSet:
    """Reads the `splits` of the registered TFDS data set `name`, pooled.

    The TFDS splits only say where images come from: classes are assigned to
    meta-train/val/test later, at the class level. Pool splits that hold
    disjoint images (Omniglot: "train,test"; its "small1"/"small2" repeat
    "train" images).

    Args:
      name: TFDS name, e.g. "omniglot".
      splits: TFDS split names to read and pool, e.g. ["train", "test"].
      data_dir: TFDS data directory (None: TFDS' default).
      download: call `download_and_prepare` first (needs network if the data
        set is not prepared yet).
      image_size, channels: see `convert_images`.

    Returns:
      ImageSet; class names are the label names, groups the group feature's
      names (Omniglot: alphabets) or "".
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    try:
        with _without_tfds_litter():
            builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        # TFDS's own message lists every data set it knows (~9 KB).
        close = difflib.get_close_matches(name, tfds.list_builders(), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ImageSourceError(
            f"--tfds_name={name}: no such TFDS data set{hint} "
            "(tensorflow_datasets.list_builders() lists them)"
        ) from error
    if download:
        try:
            builder.download_and_prepare()
        except Exception as error:  # Network, disk, missing TFDS extras, ...
            raise ImageSourceError(
                f"--tfds_name={name}: TFDS could not download and prepare it "
                f"in {builder.data_dir}: {error!r}"
            ) from error
    elif not builder.is_prepared():
        raise ImageSourceError(
            f"--tfds_name={name}: not prepared in {builder.data_dir}, and "
            "--notfds_download forbids downloading it"
        )
    features = builder.info.features
    for key in ("image", "label"):
        if key not in features:
            raise ImageSourceError(
                f"--tfds_name={name}: expected features 'image' and 'label', found "
                f"{list(features.keys())}"
            )
    known = list(builder.info.splits.keys())  # empty under tfds.testing mocks
    unknown = [s for s in splits if s not in known]
    if known and unknown:
        raise ImageSourceError(
            f"--tfds_splits: {name} has no split(s) {unknown}; it has " f"{known}"
        )
    label_names = getattr(features["label"], "names", None)
    group_feature = _TFDS_GROUP_FEATURE.get(name)
    group_names = (
        getattr(features[group_feature], "names", None) if group_feature else None
    )
    parts = []
    for split in splits:
        dataset = builder.as_dataset(split=split, shuffle_files=False)
        parts.append(
            dataset_to_image_set(
                dataset,
                label_names,
                group_feature,
                group_names,
                image_size,
                channels,
                description=f"tfds {name}[{split}]",
            )
        )
        logging.info("tfds %s[%s]: %d images", name, split, parts[-1].num_images)
    return concatenate(parts)


def load_image_folder(
    directory: str, layout: str = "class", image_size: int = 0, channels: int = 0
) -> ImageSet:
    """Reads a folder of class folders with `tfds.folder_dataset.ImageFolder`.

    Args:
      directory: DIR/<class>/<image> (layout "class") or
        DIR/<group>/<class>/<image> (layout "group/class"); .png/.jpg/.jpeg.
      layout: one of FOLDER_LAYOUTS.
      image_size, channels: see `convert_images`. With channels 0 images are
        decoded with 3 channels (ImageFolder's default); 1 or 3 decodes to that
        many channels directly.

    Returns:
      ImageSet ordered by (class folder, file name); groups are the group
      folder names ("" for layout "class").
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    if layout not in FOLDER_LAYOUTS:
        raise ImageSourceError(
            f"--image_dir_layout: expected one of {FOLDER_LAYOUTS}, found "
            f"{layout!r}"
        )
    directory = os.path.abspath(os.path.expanduser(directory))
    if not os.path.isdir(directory):
        if os.path.lexists(directory):
            raise ImageSourceError(
                f"--image_dir={directory}: {file_kinds.describe(directory)}, not "
                "a directory of images"
            )
        raise ImageSourceError(f"--image_dir: no such directory {directory!r}")
    shape = (None, None, channels or 3)
    with tempfile.TemporaryDirectory() as link_root:
        if layout == "class":
            # ImageFolder reads root/<split>/<label>/<image>: make DIR the only split.
            os.symlink(directory, os.path.join(link_root, "all"))
        with _without_tfds_litter():
            builder = tfds.folder_dataset.ImageFolder(
                link_root if layout == "class" else directory, shape=shape
            )
        label_names = builder.info.features["label"].names
        parts, file_names = [], []
        for split, info in sorted(builder.info.splits.items()):
            if info.num_examples == 0:  # folders without a single image
                continue
            dataset = builder.as_dataset(split=split, shuffle_files=False)
            where = "" if layout == "class" else f" ({split})"
            try:
                images, values = _read_examples(
                    dataset,
                    ["label", "image/filename"],
                    image_size,
                    channels,
                    description=f"--image_dir={directory}{where}",
                )
            except tf.errors.InvalidArgumentError as error:
                raise _undecodable(directory, error) from None
            class_names = _names(values["label"], label_names)
            if layout == "group/class":
                class_names = np.char.add(split + "/", class_names)
                groups = np.full(len(class_names), split)
            else:
                groups = np.full(len(class_names), "")
            parts.append(ImageSet(images, class_names, groups))
            file_names.extend(
                os.path.basename(f.decode()) for f in values["image/filename"]
            )
    _warn_of_skipped_files(directory, layout)
    if not parts:
        hint = ""
        if layout == "class" and _holds_grandchild_folders(directory):
            hint = " (its class folders hold folders: --image_dir_layout=group/class?)"
        raise ImageSourceError(
            f"--image_dir={directory}: no {'/'.join(IMAGE_SUFFIXES)} images found "
            f"for layout {layout!r}{hint}"
        )
    images = concatenate(parts)
    order = np.lexsort((np.array(file_names), images.class_names))
    return images.take(order)


def _holds_grandchild_folders(directory):
    """Whether a folder of `directory` holds a folder (group/class layout)."""
    children = (os.path.join(directory, name) for name in os.listdir(directory))
    return any(
        os.path.isdir(os.path.join(child, name))
        for child in children
        if os.path.isdir(child)
        for name in os.listdir(child)
    )


def _warn_of_skipped_files(directory, layout):
    """Logs a warning naming the files under `directory`, at the layout's
    image depth, that are not read: other suffixes (e.g. .bmp)."""
    depth = layout.count("/") + 2  # class/image, group/class/image
    skipped = []
    for root, _, names in os.walk(directory, followlinks=True):
        relative = os.path.relpath(root, directory)
        level = 0 if relative == "." else relative.count(os.sep) + 1
        if level == depth - 1:
            skipped += [
                os.path.join(relative, name)
                for name in names
                if not name.lower().endswith(IMAGE_SUFFIXES)
            ]
    if skipped:
        logging.warning(
            "--image_dir=%s: skipped %d files that are not %s images, e.g. %s",
            directory,
            len(skipped),
            "/".join(IMAGE_SUFFIXES),
            ", ".join(sorted(skipped)[:3]),
        )
