"""Tests for leo_tf.data.embeddings: reading and validating embedding pickles."""

import base64
import os
import pickle
import warnings

import numpy as np
import pytest

from leo_tf.data import embeddings
from leo_tf.data.embeddings import DataError

# Written by Python 2.7.18 with numpy 1.16.6 (the authors' environment):
#   emb = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5.5) / 4
#   keys = np.array(["1-n001-n001_a.jpg", "2-n002-n002_b.jpg",
#                    "3-n001-n001_c.jpg", "4-n002-n002_d.jpg"])  # dtype |S17
#   pickle.dumps({"embeddings": emb, "keys": keys,
#                 "labels": np.array([0, 1, 0, 1])}, 2)
PY2_ARRAY_KEYS = base64.b64decode(
    "gAJ9cQAoVQRrZXlzcQFjbnVtcHkuY29yZS5tdWx0aWFycmF5Cl9yZWNvbnN0cnVjdApxAmNu"
    "dW1weQpuZGFycmF5CnEDSwCFcQRVAWJxBYdxBlJxByhLAUsEhXEIY251bXB5CmR0eXBlCnEJ"
    "VQNTMTdxCksASwGHcQtScQwoSwNVAXxxDU5OTksRSwFLAHRxDmKJVUQxLW4wMDEtbjAwMV9h"
    "LmpwZzItbjAwMi1uMDAyX2IuanBnMy1uMDAxLW4wMDFfYy5qcGc0LW4wMDItbjAwMl9kLmpw"
    "Z3EPdHEQYlUGbGFiZWxzcRFoAmgDSwCFcRJoBYdxE1JxFChLAUsEhXEVaAlVAmk4cRZLAEsB"
    "h3EXUnEYKEsDVQE8cRlOTk5K/////0r/////SwB0cRpiiVUgAAAAAAAAAAABAAAAAAAAAAAA"
    "AAAAAAAAAQAAAAAAAABxG3RxHGJVCmVtYmVkZGluZ3NxHWgCaANLAIVxHmgFh3EfUnEgKEsB"
    "SwRLA4ZxIWgJVQJmNHEiSwBLAYdxI1JxJChLA1UBPHElTk5OSv////9K/////0sAdHEmYolV"
    "MAAAsL8AAJC/AABgvwAAIL8AAMC+AAAAvgAAAD4AAMA+AAAgPwAAYD8AAJA/AACwP3EndHEo"
    "YnUu"
)
# The same, with float64 embeddings and keys as a list of numpy byte-string
# scalars (pickled through numpy.core.multiarray.scalar):
#   pickle.dumps({"embeddings": emb.astype(np.float64), "keys": list(keys),
#                 "labels": [0, 1, 0, 1]}, 2)
PY2_SCALAR_KEYS = base64.b64decode(
    "gAJ9cQAoVQRrZXlzcQFdcQIoY251bXB5LmNvcmUubXVsdGlhcnJheQpzY2FsYXIKcQNjbnVt"
    "cHkKZHR5cGUKcQRVA1MxN3EFSwBLAYdxBlJxByhLA1UBfHEITk5OSxFLAUsAdHEJYlURMS1u"
    "MDAxLW4wMDFfYS5qcGdxCoZxC1JxDGgDaARVA1MxN3ENSwBLAYdxDlJxDyhLA1UBfHEQTk5O"
    "SxFLAUsAdHERYlURMi1uMDAyLW4wMDJfYi5qcGdxEoZxE1JxFGgDaARVA1MxN3EVSwBLAYdx"
    "FlJxFyhLA1UBfHEYTk5OSxFLAUsAdHEZYlURMy1uMDAxLW4wMDFfYy5qcGdxGoZxG1JxHGgD"
    "aARVA1MxN3EdSwBLAYdxHlJxHyhLA1UBfHEgTk5OSxFLAUsAdHEhYlURNC1uMDAyLW4wMDJf"
    "ZC5qcGdxIoZxI1JxJGVVBmxhYmVsc3ElXXEmKEsASwFLAEsBZVUKZW1iZWRkaW5nc3EnY251"
    "bXB5LmNvcmUubXVsdGlhcnJheQpfcmVjb25zdHJ1Y3QKcShjbnVtcHkKbmRhcnJheQpxKUsA"
    "hXEqVQFicSuHcSxScS0oSwFLBEsDhnEuaARVAmY4cS9LAEsBh3EwUnExKEsDVQE8cTJOTk5K"
    "/////0r/////SwB0cTNiiVVgAAAAAAAA9r8AAAAAAADyvwAAAAAAAOy/AAAAAAAA5L8AAAAA"
    "AADYvwAAAAAAAMC/AAAAAAAAwD8AAAAAAADYPwAAAAAAAOQ/AAAAAAAA7D8AAAAAAADyPwAA"
    "AAAAAPY/cTR0cTVidS4="
)
PY2_EMBEDDINGS = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5.5) / 4


def make_keys(class_ids, per_class, prefix="x"):
    """Keys in the authors' format, class by class."""
    return [
        f"{prefix}-{c}-{c}_{i:04d}.jpg" for c in class_ids for i in range(per_class)
    ]


def write_pickle(path, contents, protocol=4):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(contents, f, protocol=protocol)
    return path


def valid_contents(class_ids=("n01", "n02", "n03"), per_class=4, dim=640, seed=0):
    rng = np.random.default_rng(seed)
    n = len(class_ids) * per_class
    return {
        "embeddings": rng.standard_normal((n, dim)).astype(np.float32),
        "keys": np.array(make_keys(class_ids, per_class)),
        "labels": np.repeat(np.arange(len(class_ids)), per_class),
    }


def read_error(path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        embeddings.read_embedding_file(path, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------
# Reading.


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_round_trip_groups_rows_by_class_in_file_order(tmp_path, protocol):
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((6, 640)).astype(np.float32)
    # Classes interleaved and out of order in the file.
    keys = [
        "a-n02-n02_x.jpg",
        "b-n01-n01_y.jpg",
        "c-n02-n02_z.jpg",
        "d-n01-n01_w.jpg",
        "e-n03-n03_v.jpg",
        "f-n01-n01_u.jpg",
    ]
    path = write_pickle(
        tmp_path / "train_embeddings.pkl",
        {"embeddings": rows, "keys": np.array(keys), "labels": np.arange(6)},
        protocol=protocol,
    )
    classes = embeddings.read_embedding_file(path)
    assert classes.class_ids == ("n01", "n02", "n03")
    assert classes.examples_per_class == (3, 2, 1)
    assert classes.num_classes == 3 and classes.num_examples == 6
    assert classes.embedding_dim == 640
    assert classes.min_examples_per_class == 1
    np.testing.assert_array_equal(classes.embeddings["n01"], rows[[1, 3, 5]])
    np.testing.assert_array_equal(classes.embeddings["n02"], rows[[0, 2]])
    np.testing.assert_array_equal(classes.embeddings["n03"], rows[[4]])
    assert all(a.dtype == np.float32 for a in classes.embeddings.values())
    assert str(path) in classes.source


def test_reads_bytes_keys_and_float64_at_protocol_2(tmp_path):
    # Python 3 at protocol 2 writes bytes via _codecs.encode(..., "latin1").
    contents = valid_contents(per_class=3)
    float64 = contents["embeddings"].astype(np.float64) * 1.5
    path = write_pickle(
        tmp_path / "f.pkl",
        {
            "embeddings": float64,
            "keys": [k.encode("ascii") for k in contents["keys"]],
            "labels": contents["labels"],
        },
        protocol=2,
    )
    classes = embeddings.read_embedding_file(path)
    assert classes.class_ids == ("n01", "n02", "n03")
    assert classes.embeddings["n02"].dtype == np.float32
    np.testing.assert_array_equal(
        classes.embeddings["n02"], float64[3:6].astype(np.float32)
    )


@pytest.mark.parametrize(
    "data", [PY2_ARRAY_KEYS, PY2_SCALAR_KEYS], ids=["array_keys", "scalar_keys"]
)
def test_reads_pickles_written_by_python2_numpy1(tmp_path, data):
    path = tmp_path / "py2.pkl"
    path.write_bytes(data)
    with warnings.catch_warnings():
        # numpy 2 warns when numpy.core is imported by name; the reader
        # resolves those names itself and must not trigger it.
        warnings.simplefilter("error")
        classes = embeddings.read_embedding_file(path, embedding_dim=3)
    assert classes.class_ids == ("n001", "n002")
    np.testing.assert_array_equal(classes.embeddings["n001"], PY2_EMBEDDINGS[[0, 2]])
    np.testing.assert_array_equal(classes.embeddings["n002"], PY2_EMBEDDINGS[[1, 3]])


def test_reads_numpy1_module_names_from_python3(tmp_path):
    # numpy 1.x pickles name numpy.core.multiarray where numpy 2 writes
    # numpy._core.multiarray; protocol 2 spells globals out as text.
    contents = valid_contents()
    data = pickle.dumps(contents, protocol=2)
    assert b"numpy._core.multiarray" in data
    path = tmp_path / "np1.pkl"
    path.write_bytes(data.replace(b"numpy._core.", b"numpy.core."))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        classes = embeddings.read_embedding_file(path)
    np.testing.assert_array_equal(
        classes.embeddings["n03"], contents["embeddings"][8:12]
    )


def test_reads_latin1_python2_str_keys(tmp_path):
    # A Python 2 str with a non-ASCII byte arrives as a latin1-decoded str.
    contents = valid_contents(class_ids=("n01",), per_class=2)
    keys = ["x-n01-n01_\xe9t\xe9.jpg", "y-n01-n01_b.jpg"]
    contents["keys"] = keys
    path = write_pickle(tmp_path / "latin1.pkl", contents, protocol=2)
    classes = embeddings.read_embedding_file(path)
    assert classes.examples_per_class == (2,)


def test_embedding_dim_none_accepts_any_width(tmp_path):
    path = write_pickle(tmp_path / "f.pkl", valid_contents(dim=7))
    assert embeddings.read_embedding_file(path, embedding_dim=None).embedding_dim == 7


def test_split_path_follows_the_published_layout(tmp_path):
    assert embeddings.split_path(tmp_path, "miniImageNet", "center", "val") == (
        tmp_path / "miniImageNet" / "center" / "val_embeddings.pkl"
    )


def write_split(root, split, class_ids, per_class=4, seed=0):
    return write_pickle(
        embeddings.split_path(root, "mini", "center", split),
        valid_contents(class_ids, per_class, seed=seed),
    )


def test_train_on_val_concatenates_train_and_val(tmp_path):
    write_split(tmp_path, "train", ("n01", "n02"), seed=1)
    val_contents = valid_contents(("n03",), 5, seed=2)
    write_pickle(embeddings.split_path(tmp_path, "mini", "center", "val"), val_contents)
    write_split(tmp_path, "test", ("n04",), seed=3)

    train = embeddings.load_split(tmp_path, "mini", "center", "train")
    assert train.class_ids == ("n01", "n02")
    both = embeddings.load_split(tmp_path, "mini", "center", "train", train_on_val=True)
    assert both.class_ids == ("n01", "n02", "n03")
    np.testing.assert_array_equal(both.embeddings["n03"], val_contents["embeddings"])
    np.testing.assert_array_equal(both.embeddings["n01"], train.embeddings["n01"])
    assert "train_embeddings.pkl" in both.source
    assert "val_embeddings.pkl" in both.source
    # Only the train split changes.
    test = embeddings.load_split(tmp_path, "mini", "center", "test", train_on_val=True)
    assert test.class_ids == ("n04",)


def test_load_split_rejects_unknown_split(tmp_path):
    with pytest.raises(DataError, match="split.*'valid'"):
        embeddings.load_split(tmp_path, "mini", "center", "valid")


# ---------------------------------------------------------------------------
# Validation: each error names the file and the field, the expectation and
# what was found.


def test_missing_file_lists_what_is_in_the_directory(tmp_path):
    write_split(tmp_path, "train", ("n01",))
    with pytest.raises(DataError) as info:
        embeddings.load_split(tmp_path, "mini", "center", "test")
    message = str(info.value)
    assert "test_embeddings.pkl: file not found" in message
    assert "contains: train_embeddings.pkl" in message


def test_missing_directory_says_so_and_lists_the_nearest_parent(tmp_path):
    write_split(tmp_path, "train", ("n01",))
    with pytest.raises(DataError) as info:
        embeddings.load_split(tmp_path, "mini", "multiview", "train")
    message = str(info.value)
    assert f"directory {tmp_path / 'mini' / 'multiview'} does not exist" in (message)
    assert f"{tmp_path / 'mini'} contains: center/" in message
    assert "<dataset_name>/<embedding_crop>" in message


def test_not_a_pickle(tmp_path):
    path = tmp_path / "junk.pkl"
    path.write_bytes(b"this is not a pickle at all")
    message = read_error(path)
    assert str(path) in message and "corrupt, truncated or non-pickle" in (message)


def test_truncated_pickle(tmp_path):
    path = write_pickle(tmp_path / "cut.pkl", valid_contents())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = read_error(path)
    assert str(path) in message and "truncated" in message


def test_directory_instead_of_file(tmp_path):
    path = tmp_path / "dir.pkl"
    path.mkdir()
    assert "expected a file, found a directory" in read_error(path)


def test_top_level_not_a_dict(tmp_path):
    path = write_pickle(tmp_path / "list.pkl", [1, 2, 3])
    message = read_error(path)
    assert str(path) in message
    assert "expected a dict" in message and "found list" in message


@pytest.mark.parametrize("field", ["embeddings", "keys"])
def test_missing_field(tmp_path, field):
    contents = valid_contents()
    del contents[field]
    path = write_pickle(tmp_path / "f.pkl", contents)
    message = read_error(path)
    assert f"{path}: missing field '{field}'" in message
    assert "labels" in message  # what the file does have


def test_wrong_rank(tmp_path):
    contents = valid_contents()
    contents["embeddings"] = contents["embeddings"].reshape(3, 4, 640)
    path = write_pickle(tmp_path / "f.pkl", contents)
    message = read_error(path)
    assert f"{path}: field 'embeddings'" in message
    assert "expected rank 2" in message and "found rank 3" in message


def test_wrong_width(tmp_path):
    path = write_pickle(tmp_path / "f.pkl", valid_contents(dim=512))
    message = read_error(path)
    assert f"{path}: field 'embeddings'" in message
    assert "expected width D=640" in message and "(12, 512)" in message


@pytest.mark.parametrize(
    "bad",
    [
        np.full((12, 640), "x"),
        np.empty((12, 640), dtype=object),
        np.zeros((12, 640), dtype=bool),
    ],
    ids=["str", "object", "bool"],
)
def test_non_numeric_dtype(tmp_path, bad):
    contents = valid_contents()
    contents["embeddings"] = bad
    path = write_pickle(tmp_path / "f.pkl", contents)
    message = read_error(path)
    assert f"{path}: field 'embeddings'" in message
    assert "expected a numeric" in message and str(bad.dtype) in message


def test_keys_and_embeddings_lengths_differ(tmp_path):
    contents = valid_contents()
    contents["keys"] = contents["keys"][:-2]
    path = write_pickle(tmp_path / "f.pkl", contents)
    message = read_error(path)
    assert f"{path}: field 'keys'" in message
    assert "(12)" in message and "found 10 keys" in message


@pytest.mark.parametrize(
    "bad_key, expected",
    [
        ("x-n02_0001.jpg", "found 2"),
        ("x-y-n02-n02_0001.jpg", "found 4"),
        ("x-n02-n03_0001.jpg", "class id 'n02' and file name prefix 'n03'"),
        ("x-n02-n020001.jpg", "file name prefix 'n020001.jpg'"),
        ("x--_0001.jpg", "class id ''"),
    ],
)
def test_malformed_key_is_quoted_with_its_row(tmp_path, bad_key, expected):
    contents = valid_contents()
    keys = list(contents["keys"])
    keys[5] = bad_key
    contents["keys"] = keys
    path = write_pickle(tmp_path / "f.pkl", contents)
    message = read_error(path)
    assert f"{path}: field 'keys': malformed key {bad_key!r} at row 5" in (message)
    assert expected in message


def test_key_that_is_not_a_string(tmp_path):
    contents = valid_contents()
    keys = list(contents["keys"])
    keys[2] = 17
    contents["keys"] = keys
    path = write_pickle(tmp_path / "f.pkl", contents)
    message = read_error(path)
    assert f"{path}: field 'keys': row 2: expected a string" in message


def test_duplicate_image_file(tmp_path):
    contents = valid_contents()
    keys = list(contents["keys"])
    # Same image file under a different first field: the authors index by
    # image file, so one example would silently vanish.
    keys[7] = "other-" + keys[4].split("-", 1)[1]
    contents["keys"] = keys
    path = write_pickle(tmp_path / "f.pkl", contents)
    message = read_error(path)
    assert f"{path}: field 'keys': duplicate image file 'n02_0000.jpg'" in (message)
    assert "row 7" in message and "row 4" in message


def test_duplicate_image_file_across_train_and_val(tmp_path):
    write_split(tmp_path, "train", ("n01",))
    write_split(tmp_path, "val", ("n01",))
    with pytest.raises(DataError) as info:
        embeddings.load_split(tmp_path, "mini", "center", "train", train_on_val=True)
    message = str(info.value)
    assert "val_embeddings.pkl: field 'keys': duplicate image file" in message
    assert "train_embeddings.pkl" in message


def test_non_finite_values_are_counted_and_located(tmp_path):
    contents = valid_contents()
    contents["embeddings"][3, 10] = np.nan
    contents["embeddings"][3, 11] = np.inf
    contents["embeddings"][9, 0] = -np.inf
    path = write_pickle(tmp_path / "f.pkl", contents)
    message = read_error(path)
    assert f"{path}: field 'embeddings'" in message
    assert "3 non-finite values in 2 rows" in message
    assert f"first at row 3 (key {str(contents['keys'][3])!r})" in message


def test_float64_overflowing_float32_is_non_finite(tmp_path):
    contents = valid_contents()
    embeddings64 = contents["embeddings"].astype(np.float64)
    embeddings64[5, 5] = 1e300
    contents["embeddings"] = embeddings64
    path = write_pickle(tmp_path / "f.pkl", contents)
    assert "1 non-finite values in 1 rows, the first at row 5" in read_error(path)


def test_empty_file(tmp_path):
    path = write_pickle(
        tmp_path / "f.pkl",
        {
            "embeddings": np.zeros((0, 640), np.float32),
            "keys": np.array([], dtype=str),
            "labels": np.array([]),
        },
    )
    message = read_error(path)
    assert f"{path}: field 'embeddings'" in message
    assert "found 0 rows" in message


# ---------------------------------------------------------------------------
# Restricted unpickling.


class RunsACommand:
    """Unpickling this calls os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class CallsEval:

    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_refuses_a_pickle_that_would_run_a_command(tmp_path):
    marker = tmp_path / "marker"
    contents = valid_contents()
    contents["labels"] = RunsACommand(f"touch {marker}")
    path = write_pickle(tmp_path / "evil.pkl", contents, protocol=2)
    # Sanity check of the test itself: a plain pickle.load would run it.
    assert f"touch {marker}".encode() in path.read_bytes()
    message = read_error(path)
    assert message.startswith(
        f"refusing to unpickle {os.system.__module__}" f".system from {path}"
    )
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_refuses_builtins_eval(tmp_path, protocol):
    path = write_pickle(tmp_path / "evil.pkl", {"keys": CallsEval()}, protocol=protocol)
    # Python 3 writes Python 2's module name (__builtin__) below protocol 3.
    module = "__builtin__" if protocol < 3 else "builtins"
    assert f"refusing to unpickle {module}.eval from {path}" in read_error(path)


def test_refuses_codecs_encode_with_another_codec(tmp_path):
    # Hand-written protocol 2: _codecs.encode("text", "rot13").
    data = (
        b"\x80\x02c_codecs\nencode\nX\x04\x00\x00\x00textX\x05\x00\x00"
        b"\x00rot13\x86R."
    )
    path = tmp_path / "codec.pkl"
    path.write_bytes(data)
    message = read_error(path)
    assert "refusing to unpickle _codecs.encode with encoding 'rot13'" in (message)


def test_refuses_numpy_functions_outside_the_list(tmp_path):
    # numpy.load could read arbitrary files; it is not something an
    # embedding pickle needs.
    data = b"\x80\x02cnumpy\nload\nX\x03\x00\x00\x00/x\x85R."
    path = tmp_path / "np.pkl"
    path.write_bytes(data)
    assert f"refusing to unpickle numpy.load from {path}" in read_error(path)


# ---------------------------------------------------------------------------
# Episode requirements.


def small_classes(counts):
    rng = np.random.default_rng(0)
    return embeddings.ClassEmbeddings(
        source="mem.pkl",
        embeddings={f"c{i}": rng.standard_normal((n, 4)) for i, n in enumerate(counts)},
    )


def test_requirements_pass_when_met():
    embeddings.check_episode_requirements(
        small_classes([16, 20, 30, 16, 17]),
        num_classes=5,
        examples_per_class=16,
        split="train",
    )


def test_requirements_fewer_classes_than_ways():
    with pytest.raises(DataError) as info:
        embeddings.check_episode_requirements(
            small_classes([20] * 4), num_classes=5, examples_per_class=16, split="val"
        )
    message = str(info.value)
    assert "mem.pkl: split 'val'" in message
    assert "at least 5 classes" in message and "found 4" in message


def test_requirements_name_the_small_class_and_both_counts():
    with pytest.raises(DataError) as info:
        embeddings.check_episode_requirements(
            small_classes([20, 20, 12, 20, 20, 20]),
            num_classes=5,
            examples_per_class=16,
            split="test",
        )
    message = str(info.value)
    assert "mem.pkl: split 'test'" in message
    assert "at least 16 examples" in message
    assert "class 'c2' has 12" in message


def test_class_embeddings_reject_mixed_widths():
    with pytest.raises(DataError, match="class 'b'.*\\[n_c, 4\\].*\\(2, 5\\)"):
        embeddings.ClassEmbeddings(
            source="mem", embeddings={"a": np.zeros((2, 4)), "b": np.zeros((2, 5))}
        )
