"""Bad data refused early and cheaply, naming the file.

Arrays whose declared size the file cannot hold, files that are not regular
files, splits that share classes or examples, and broken packed image files.
"""

import codecs
import dataclasses
import io
import os
import pickle
import shutil
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest

from leo_tf import config as config_lib
from leo_tf.data import embeddings, meta_dataset
from leo_tf.data.embeddings import DataError
from leo_tf.embedding import images as images_lib
from tests import data_fixtures

# numpy's own pickling functions, under the installed numpy's module names.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]

GIB = 2**30


class Reduces:
    """Pickles as `func(*args)`, then `__setstate__(state)` if state is given:
    hand-made pickles that declare whatever shape a test needs."""

    def __init__(self, func, args, state=None):
        self.reduced = (func, args) if state is None else (func, args, state)

    def __reduce__(self):
        return self.reduced


def write_pickle(path, contents, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(contents, f, protocol=protocol)
    return path


def read_error_and_peak(path):
    """The DataError message of reading `path`, and the peak bytes traced
    (numpy reports its array buffers to tracemalloc) while reading."""
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            embeddings.read_embedding_file(path, embedding_dim=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(info.value), peak


# ---------------------------------------------------------------------------
# Declared sizes.

# (id, the 'embeddings' field, pickle protocol, fragments of the message)
HUGE_ARRAYS = [
    (
        "ndarray_called_with_a_huge_shape",
        Reduces(np.ndarray, ((GIB // 2560, 640), np.dtype(np.float32))),
        2,
        ["shape (419430, 640) and dtype float32", "holds no bytes of data"],
    ),
    (
        "reconstruct_with_a_huge_shape",
        Reduces(_RECONSTRUCT, (np.ndarray, (GIB,), b"b")),
        2,
        ["shape (1073741824,) and dtype int8", "holds no bytes of data"],
    ),
    (
        "state_declaring_more_than_its_data",
        Reduces(
            _RECONSTRUCT,
            (np.ndarray, (0,), b"b"),
            (1, (GIB // 2560, 640), np.dtype(np.float32), False, bytes(16)),
        ),
        4,
        ["(1073740800 bytes)", "the file holds 16 bytes of data for it"],
    ),
    (
        "protocol_5_buffer_shorter_than_its_shape",
        Reduces(_FROMBUFFER, (bytearray(16), np.dtype(np.float32), (GIB // 4,), "C")),
        5,
        ["shape (268435456,)", "the file holds 16 bytes of data for it"],
    ),
    (
        # numpy itself crashes the process (segfault) on this state.
        "object_array_longer_than_its_list",
        Reduces(
            _RECONSTRUCT,
            (np.ndarray, (0,), b"b"),
            (1, (5,), np.dtype(object), False, [1.0, 2.0]),
        ),
        2,
        ["shape (5,) and dtype object", "5 Python objects", "holds 2 of them"],
    ),
]


@pytest.mark.parametrize(
    "field,protocol,fragments",
    [case[1:] for case in HUGE_ARRAYS],
    ids=[case[0] for case in HUGE_ARRAYS],
)
def test_an_array_larger_than_its_data_is_refused_before_allocation(
    tmp_path, field, protocol, fragments
):
    path = write_pickle(
        tmp_path / "huge.pkl", {"embeddings": field, "keys": []}, protocol
    )
    assert path.stat().st_size < 400
    message, peak = read_error_and_peak(path)
    assert message.startswith(f"{path}: field 'embeddings': declares an array of ")
    for fragment in fragments:
        assert fragment in message
    assert peak < 2**24  # far below the declared size


def test_bytes_of_a_huge_length_are_refused(tmp_path):
    path = write_pickle(tmp_path / "b.pkl", {"embeddings": Reduces(bytes, (GIB,))})
    message, peak = read_error_and_peak(path)
    assert message == (
        f"refusing to unpickle bytes({GIB},) from {path}: only empty bytes are "
        "pickled that way"
    )
    assert peak < 2**24


def test_one_string_decoded_over_and_over_is_refused(tmp_path):
    text = "x" * 100_000  # one object: pickled once, then referenced
    path = write_pickle(
        tmp_path / "many.pkl",
        {"embeddings": [Reduces(codecs.encode, (text, "latin1")) for _ in range(1000)]},
    )
    assert path.stat().st_size < 200_000
    message, peak = read_error_and_peak(path)
    assert message.startswith(f"{path}: a byte string declares 100000 bytes, ")
    assert "more than the file's" in message
    assert peak < 2**24


def test_rows_repeating_one_list_are_refused_before_building_the_array(tmp_path):
    row = [0.5] * 640  # one object: pickled once, then referenced
    path = write_pickle(
        tmp_path / "rows.pkl", {"embeddings": [row] * 20_000, "keys": []}
    )
    assert path.stat().st_size < 100_000
    message, peak = read_error_and_peak(path)
    assert message == (
        f"{path}: field 'embeddings': a list of 20000 rows holding 12800000 "
        f"values in all, more than the file's {path.stat().st_size} bytes could "
        "store (its rows repeat references to the same objects); refusing to "
        "build it"
    )
    assert peak < 2**24  # the array would take 102 MB as float64


# ---------------------------------------------------------------------------
# Files that are not regular files.


def read_without_blocking(path) -> str:
    """The DataError message of reading `path`; fails if reading blocks."""
    outcome = {}

    def read():
        try:
            embeddings.read_embedding_file(path)
        except DataError as e:
            outcome["message"] = str(e)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), f"reading {path} blocked"
    return outcome["message"]


def test_a_fifo_is_named_without_opening_it(tmp_path):
    path = tmp_path / "train_embeddings.pkl"
    os.mkfifo(path)
    assert read_without_blocking(path) == (
        f"{path}: expected a file, found a FIFO (named pipe)"
    )


def test_a_character_device_is_named(tmp_path):
    path = tmp_path / "train_embeddings.pkl"
    path.symlink_to("/dev/zero")
    assert read_without_blocking(path) == (
        f"{path}: expected a file, found a character device"
    )


def test_a_broken_symbolic_link_names_its_target(tmp_path):
    path = tmp_path / "train_embeddings.pkl"
    path.symlink_to(tmp_path / "moved" / "train_embeddings.pkl")
    assert read_without_blocking(path) == (
        f"{path}: expected a file, found a broken symbolic link to "
        f"{str(tmp_path / 'moved' / 'train_embeddings.pkl')!r}"
    )


# ---------------------------------------------------------------------------
# Splits that share classes or examples.


def toy_data_config(data_path, **changes):
    return dataclasses.replace(
        config_lib.DataConfig(data_path=str(data_path), dataset_name="toy"), **changes
    )


def toy_split(data_path, split):
    return data_path / "toy" / "center" / f"{split}_embeddings.pkl"


@pytest.fixture
def toy(tmp_path):
    return data_fixtures.write_toy_dataset(tmp_path / "data")


def load_refusal(config, split):
    """The message of the DataError that loading `split` raises."""
    with pytest.raises(DataError) as info:
        meta_dataset.load_classes(config, split)
    return str(info.value)


def test_val_that_repeats_the_train_classes_is_refused_naming_them(toy):
    shutil.copyfile(toy_split(toy, "train"), toy_split(toy, "val"))
    assert load_refusal(toy_data_config(toy), "train") == (
        f"{toy_split(toy, 'val')}: split 'val' shares 12 of its 12 classes with "
        f"split 'train' ({toy_split(toy, 'train')}): 'ntr00000', 'ntr00001', "
        "'ntr00002', 'ntr00003', 'ntr00004' and 7 more; a leak between the "
        "splits; pass --allow_split_overlap to use them anyway"
    )


def copy_train_rows_into_test(data_path, count):
    """Gives the first `count` test rows the embeddings of train rows 30.."""
    with open(toy_split(data_path, "train"), "rb") as f:
        train = pickle.load(f)
    with open(toy_split(data_path, "test"), "rb") as f:
        test = pickle.load(f)
    test["embeddings"][:count] = train["embeddings"][30 : 30 + count]
    write_pickle(toy_split(data_path, "test"), test)


def test_test_examples_identical_to_train_examples_are_refused(toy):
    copy_train_rows_into_test(toy, 3)  # train rows 30-32: class ntr00001
    assert load_refusal(toy_data_config(toy), "test") == (
        f"{toy_split(toy, 'test')}: split 'test' has 3 of its 144 examples "
        f"identical to examples of split 'train' ({toy_split(toy, 'train')}), "
        "e.g. in class 'nte00000' (identical to one of class 'ntr00001'); a "
        "leak between the splits; pass --allow_split_overlap to use them anyway"
    )


def test_all_zero_examples_in_two_splits_are_no_leak_but_other_copies_are(toy):
    """An embedding network can map images of different classes to all-zero
    rows (every ReLU feature off): those carry no image, so they are not
    compared; a non-zero copy in the same splits is still refused."""
    splits = {}
    for split in ("train", "test"):
        with open(toy_split(toy, split), "rb") as f:
            splits[split] = pickle.load(f)
        splits[split]["embeddings"][5] = 0.0
        splits[split]["embeddings"][6] = -0.0
        write_pickle(toy_split(toy, split), splits[split])
    config = toy_data_config(toy)
    assert meta_dataset.load_classes(config, "test").num_examples == 144

    splits["test"]["embeddings"][7] = splits["train"]["embeddings"][40]
    write_pickle(toy_split(toy, "test"), splits["test"])
    assert load_refusal(config, "test").startswith(
        f"{toy_split(toy, 'test')}: split 'test' has 1 of its 144 examples "
        "identical to examples of split 'train'"
    )


def test_allow_split_overlap_accepts_shared_classes_and_examples(toy):
    copy_train_rows_into_test(toy, 3)
    shutil.copyfile(toy_split(toy, "train"), toy_split(toy, "val"))
    config = toy_data_config(toy, allow_split_overlap=True)
    assert meta_dataset.load_classes(config, "val").num_classes == 12
    assert meta_dataset.load_classes(config, "test").num_examples == 144


def test_train_on_val_trains_on_val_but_refuses_val_classes_in_test(toy):
    config = toy_data_config(toy, train_on_val=True)
    assert meta_dataset.load_classes(config, "train").num_classes == 18
    assert meta_dataset.load_classes(config, "val").num_classes == 6
    shutil.copyfile(toy_split(toy, "val"), toy_split(toy, "test"))
    assert load_refusal(config, "train").startswith(
        f"{toy_split(toy, 'test')}: split 'test' shares 6 of its 6 classes with "
        f"split 'train' ({toy_split(toy, 'train')} + {toy_split(toy, 'val')}): "
        "'nva00000', "
    )


# ---------------------------------------------------------------------------
# Packed image files for `leo_tf.embed --packed_omniglot`.


def packed_arrays(n=4):
    """The arrays of a tiny packed Omniglot: n blank 28x28 characters."""
    return {
        "images": np.full((n, 28, 28), 255, np.uint8),
        "char_id": np.arange(n, dtype=np.int32),
        "drawing": np.zeros(n, np.int32),
        "alphabet": np.array(["Latin"] * n),
        "character": np.array([f"character{i:02d}" for i in range(n)]),
    }


def write_npz(path, **changes):
    np.savez(path, **{**packed_arrays(), **changes})


def write_truncated_npz(path):
    np.savez_compressed(path, **packed_arrays())
    path.write_bytes(path.read_bytes()[:-200])


def write_npz_declaring_a_huge_images_array(path):
    """A valid .npz, except that the images' header declares 10^6 images."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (10**6, 28, 28)}
    )
    arrays = packed_arrays()
    with zipfile.ZipFile(path, "w") as archive:
        for key, array in arrays.items():
            with archive.open(f"{key}.npy", "w") as member:
                if key == "images":
                    member.write(header.getvalue() + array.tobytes())
                else:
                    np.lib.format.write_array(member, array)


# (id, writes the file, the message after "<path>: ")
BAD_PACKED_FILES = [
    (
        "text_file",
        lambda path: path.write_text("images,char_id\n"),
        "expected a .npz file (numpy.savez: a zip archive of .npy arrays), found "
        "a file that is not a zip archive",
    ),
    (
        "truncated_zip",
        write_truncated_npz,
        "expected a .npz file (numpy.savez: a zip archive of .npy arrays), found "
        "a damaged or truncated zip archive (File is not a zip file)",
    ),
    (
        "object_array",
        lambda path: write_npz(path, alphabet=np.array(["Latin"] * 4, dtype=object)),
        "key 'alphabet': expected strings [n], found an array of Python objects "
        "(dtype object), which only unpickling could read: refused",
    ),
    (
        "wrong_dtype",
        lambda path: write_npz(path, drawing=np.array(["a", "b", "c", "d"])),
        "key 'drawing': expected integers [n], found <U1 [4]",
    ),
    (
        "wrong_rank",
        lambda path: write_npz(path, images=np.zeros((4, 784), np.uint8)),
        "key 'images': expected uint8 [n, H, W], found uint8 [4, 784]",
    ),
    (
        "inconsistent_lengths",
        lambda path: write_npz(path, drawing=np.zeros(3, np.int32)),
        "key 'drawing': expected one value per image of key 'images' (4), found 3",
    ),
    (
        "declared_size_larger_than_the_data",
        write_npz_declaring_a_huge_images_array,
        "key 'images': declares uint8 [1000000, 28, 28] (784000000 bytes of "
        "data), but its .npy member holds 3136 bytes of data: the file is "
        "corrupt or truncated",
    ),
]


@pytest.mark.parametrize(
    "write,message",
    [case[1:] for case in BAD_PACKED_FILES],
    ids=[case[0] for case in BAD_PACKED_FILES],
)
def test_bad_packed_image_files_are_named_with_their_key(tmp_path, write, message):
    path = tmp_path / "omniglot.npz"
    write(path)
    tracemalloc.start()
    try:
        with pytest.raises(images_lib.ImageSourceError) as info:
            images_lib.load_packed_omniglot(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value) == f"{path}: {message}"
    assert peak < 2**24


def test_a_fifo_as_packed_images_is_named_without_opening_it(tmp_path):
    path = tmp_path / "omniglot.npz"
    os.mkfifo(path)
    with pytest.raises(images_lib.ImageSourceError) as info:
        images_lib.load_packed_omniglot(str(path))
    assert str(info.value) == (
        f"--packed_omniglot={path}: expected a file, found a FIFO (named pipe)"
    )
