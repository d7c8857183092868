"""Malformed inputs, a table of them: each refused with a specific error.

Each fails before any training step, leaving every file under
--checkpoint_path as it was.
"""

import dataclasses
import os
import pickle
import shutil
import subprocess

import numpy as np
import pytest

from leo_tf import checkpoints, export, memory, steps, trainer
from leo_tf import config as config_lib
from leo_tf.data.embeddings import DataError
from tests import data_fixtures, run_fixtures

TRAIN = "toy/center/train_embeddings.pkl"
VAL = "toy/center/val_embeddings.pkl"
TEST = "toy/center/test_embeddings.pkl"


class _Malicious:
    def __reduce__(self):
        return (os.system, ("touch MALICIOUS_RAN",))


def _load(data, name=TRAIN):
    with open(data / name, "rb") as stream:
        return pickle.load(stream, encoding="latin1")


def _dump(data, payload, name=TRAIN):
    with open(data / name, "wb") as stream:
        pickle.dump(payload, stream, protocol=2)


def _edit(name, change):
    """A case that rewrites pickle `name` with change(payload)."""

    def setup(data, run):
        payload = _load(data, name)
        change(payload)
        _dump(data, payload, name)
        return {}

    return setup


def _write_bytes(content):
    def setup(data, run):
        (data / TRAIN).write_bytes(content(data))
        return {}

    return setup


def _set(**overrides):
    """A case that only changes the configuration."""
    return lambda data, run: overrides


def _rows(payload, index, value):
    payload["embeddings"] = payload["embeddings"].copy()
    payload["embeddings"][index] = value


def _read_only(data, run):
    if os.geteuid() == 0:
        # Root ignores permission bits; an immutable directory stops it.
        if subprocess.run(["chattr", "+i", str(run)]).returncode != 0:
            pytest.fail("cannot make a read-only directory as root (chattr)")
    else:
        run.chmod(0o555)
    return {}


def _other_data_set(data, run):
    data_fixtures.write_toy_dataset(data, name="wide", dim=24)
    return {"data": {"dataset_name": "wide"}}


def _drop_class_examples(split_name, keep):
    """Keeps only `keep` examples of the first class of a split."""

    def change(payload):
        keys = np.asarray(payload["keys"])
        first = keys[0].split("-")[1]
        mask = np.array([k.split("-")[1] != first for k in keys])
        mask[:keep] = True
        payload["keys"] = keys[mask]
        payload["embeddings"] = payload["embeddings"][mask]

    return _edit(split_name, change)


def _keep_classes(split_name, count):
    def change(payload):
        keys = np.asarray(payload["keys"])
        classes = sorted({k.split("-")[1] for k in keys})[:count]
        mask = np.array([k.split("-")[1] in classes for k in keys])
        payload["keys"] = keys[mask]
        payload["embeddings"] = payload["embeddings"][mask]

    return _edit(split_name, change)


# (id, setup, exception, fragments of the message)
CASES = [
    (
        "corrupt_bytes",
        _write_bytes(lambda d: os.urandom(4096)),
        DataError,
        [TRAIN, "corrupt, truncated or non-pickle"],
    ),
    (
        "truncated",
        _write_bytes(lambda d: (d / TRAIN).read_bytes()[:2000]),
        DataError,
        [TRAIN, "corrupt, truncated or non-pickle"],
    ),
    ("empty_file", _write_bytes(lambda d: b""), DataError, [TRAIN, "pickle"]),
    (
        "not_a_dict",
        _write_bytes(lambda d: pickle.dumps([1, 2, 3], protocol=2)),
        DataError,
        [TRAIN, "expected a dict", "list"],
    ),
    (
        "malicious_global",
        _write_bytes(lambda d: pickle.dumps(_Malicious())),
        DataError,
        [TRAIN, "refusing to unpickle", "system"],
    ),
    (
        "missing_embeddings",
        _edit(TRAIN, lambda p: p.pop("embeddings")),
        DataError,
        [TRAIN, "embeddings"],
    ),
    ("missing_keys", _edit(TRAIN, lambda p: p.pop("keys")), DataError, [TRAIN, "keys"]),
    (
        "rank_1",
        _edit(TRAIN, lambda p: p.update(embeddings=p["embeddings"][:, 0])),
        DataError,
        [TRAIN, "field 'embeddings'", "rank"],
    ),
    (
        "rank_3",
        _edit(TRAIN, lambda p: p.update(embeddings=p["embeddings"][:, :, None])),
        DataError,
        [TRAIN, "field 'embeddings'", "rank"],
    ),
    (
        "string_dtype",
        _edit(TRAIN, lambda p: p.update(embeddings=p["embeddings"].astype(str))),
        DataError,
        [TRAIN, "field 'embeddings'"],
    ),
    (
        "val_wider_than_train",
        _edit(
            VAL,
            lambda p: p.update(
                embeddings=np.concatenate([p["embeddings"]] * 2, axis=1)
            ),
        ),
        DataError,
        [VAL, "field 'embeddings'", "D=16"],
    ),
    (
        "nan_value",
        _edit(TRAIN, lambda p: _rows(p, 3, np.nan)),
        DataError,
        [TRAIN, "field 'embeddings'", "non-finite"],
    ),
    (
        "inf_value",
        _edit(TRAIN, lambda p: _rows(p, 5, np.inf)),
        DataError,
        [TRAIN, "field 'embeddings'", "non-finite"],
    ),
    (
        "fewer_keys",
        _edit(TRAIN, lambda p: p.update(keys=p["keys"][:-1])),
        DataError,
        [TRAIN, "field 'keys'", "one key per row"],
    ),
    (
        "duplicate_key",
        _edit(
            TRAIN,
            lambda p: p.update(keys=np.concatenate([p["keys"][:1], p["keys"][:-1]])),
        ),
        DataError,
        [TRAIN, "field 'keys'", "duplicate"],
    ),
    (
        "key_two_fields",
        _edit(
            TRAIN,
            lambda p: p.update(
                keys=np.concatenate([["toy-n0001_0001.JPEG"], p["keys"][1:]])
            ),
        ),
        DataError,
        [TRAIN, "field 'keys'", "malformed key", "row 0"],
    ),
    (
        "key_class_mismatch",
        _edit(
            TRAIN,
            lambda p: p.update(
                keys=np.concatenate([["toy-ntr00000-nzz99999_0.JPEG"], p["keys"][1:]])
            ),
        ),
        DataError,
        [TRAIN, "field 'keys'", "malformed key"],
    ),
    (
        "key_not_string",
        _edit(TRAIN, lambda p: p.update(keys=[7] + list(p["keys"][1:]))),
        DataError,
        [TRAIN, "field 'keys'"],
    ),
    ("too_few_val_classes", _keep_classes(VAL, 3), DataError, [VAL, "5", "3"]),
    (
        "too_few_train_examples",
        _drop_class_examples(TRAIN, 10),
        DataError,
        [TRAIN, "ntr00000", "10", "16"],
    ),
    ("val_class_without_queries", _drop_class_examples(VAL, 1), DataError, [VAL, "1"]),
    (
        "missing_val_file",
        lambda d, r: (d / VAL).unlink() or {},
        DataError,
        [VAL, "train_embeddings.pkl"],
    ),
    (
        "missing_dataset",
        _set(data={"dataset_name": "absent"}),
        DataError,
        ["--dataset_name=absent", "available: ", "toy"],
    ),
    (
        "checkpoint_path_is_a_file",
        lambda d, r: {"train": {"checkpoint_path": str(r / "ckpt-10.index")}},
        checkpoints.CheckpointError,
        ["--checkpoint_path=", "ckpt-10.index", "not a directory"],
    ),
    (
        "checkpoint_parent_is_a_file",
        lambda d, r: {"train": {"checkpoint_path": str(r / "config.json" / "run")}},
        checkpoints.CheckpointError,
        ["config.json", "cannot be created"],
    ),
    (
        "read_only_checkpoint_path",
        _read_only,
        checkpoints.CheckpointError,
        ["not writable"],
    ),
    (
        "other_num_latents",
        _set(model={"num_latents": 16}),
        config_lib.ConfigError,
        ["--num_latents=16", "num_latents=8"],
    ),
    (
        "other_embedding_width",
        _other_data_set,
        config_lib.ConfigError,
        ["--dataset_name=wide", "24-d", "16-d"],
    ),
    (
        "corrupt_config_json",
        lambda d, r: (r / "config.json").write_text("{") and {},
        checkpoints.CheckpointError,
        ["config.json", "unreadable"],
    ),
]


@pytest.fixture(scope="module")
def existing(toy_data, tmp_path_factory):
    """The toy data set and a 10-step run directory made from it."""
    run = tmp_path_factory.mktemp("existing") / "run"
    trainer.train(
        run_fixtures.toy_run_config(
            toy_data, run, num_steps_limit=10, checkpoint_steps=10
        )
    )
    return toy_data, run


_snapshot = run_fixtures.snapshot


def _config(data, run, overrides):
    config = run_fixtures.toy_run_config(data, run, num_steps_limit=20)
    for section, values in overrides.items():
        config = dataclasses.replace(
            config, **{section: dataclasses.replace(getattr(config, section), **values)}
        )
    return config


@pytest.mark.parametrize("case,setup,error,fragments", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_fails_before_training_and_changes_nothing(
    existing, tmp_path, monkeypatch, case, setup, error, fragments
):
    data = tmp_path / "data"
    run = tmp_path / "run"
    shutil.copytree(existing[0], data)
    shutil.copytree(existing[1], run, symlinks=True)
    monkeypatch.chdir(tmp_path)

    def no_training(*args, **kwargs):
        raise AssertionError("a training step was compiled")

    monkeypatch.setattr(steps, "compile_train_step", no_training)
    overrides = setup(data, run)
    before = _snapshot(run)
    try:
        with pytest.raises(error) as raised:
            config = _config(data, run, overrides)
            config_lib.check(config)
            trainer.train(config)
    finally:
        if case == "read_only_checkpoint_path" and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(run)], check=True)
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert _snapshot(run) == before
    assert not (tmp_path / "MALICIOUS_RAN").exists()


@pytest.mark.parametrize(
    "setup,fragments",
    [
        (
            _keep_classes(TEST, 3),
            ["split 'test': expected at least 5 classes for 5-way episodes, found 3"],
        ),
        (
            _drop_class_examples(TEST, 1),
            ["expected more than 1 examples in every class", "found class 'nte"],
        ),
    ],
    ids=["too_few_test_classes", "test_class_without_queries"],
)
def test_a_test_split_that_cannot_be_evaluated_is_refused_before_training(
    existing, tmp_path, setup, fragments
):
    """The meta-test's data are checked with the run's (leo_tf.train checks
    memory.check_run first), not after all of its training."""
    data = tmp_path / "data"
    shutil.copytree(existing[0], data)
    setup(data, tmp_path / "run")
    config = _config(
        data, tmp_path / "run", {"train": {"evaluate_after_training": True}}
    )
    with pytest.raises(DataError) as raised:
        memory.check_run(config)
    assert str(raised.value).startswith(str(data / TEST))
    for fragment in fragments:
        assert fragment in str(raised.value), str(raised.value)
    memory.check_run(  # without the meta-test, the test split is not needed
        _config(data, tmp_path / "run", {})
    )


def test_existing_export_directory_is_refused_and_kept(existing, tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "model.txt").write_text("previous")
    before = _snapshot(target)
    for overwrite in (False, True):  # --overwrite replaces only a SavedModel
        with pytest.raises(
            export.ExportError,
            match=r"export: not empty and not a SavedModel \(holds model.txt\)",
        ):
            export.export(existing[1], target, overwrite=overwrite)
        assert _snapshot(target) == before
