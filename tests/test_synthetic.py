"""Tests for leo_tf.data.synthetic: the built-in default data set."""

import errno
import os
import pathlib
import pickle
import re
import threading

import numpy as np
import pytest

from leo_tf.data import embeddings
from leo_tf.data import synthetic
from leo_tf.data.embeddings import DataError
from tests import run_fixtures

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="session")
def data_path(tmp_path_factory):
    """One generated copy shared by the read-only tests."""
    path = tmp_path_factory.mktemp("data")
    synthetic.ensure_synthetic(path)
    return path


def load(data_path, split):
    return embeddings.load_split(data_path, "synthetic", "center", split)


def test_layout_sizes_and_class_ids(data_path):
    assert sorted(p.name for p in (data_path / "synthetic" / "center").iterdir()) == [
        "test_embeddings.pkl",
        "train_embeddings.pkl",
        "val_embeddings.pkl",
    ]
    seen = set()
    for split, num_classes in zip(SPLITS, (64, 16, 20)):
        classes = load(data_path, split)
        assert classes.num_classes == num_classes
        assert set(classes.examples_per_class) == {100}
        assert classes.embedding_dim == 640
        assert all(re.fullmatch(r"s\d{7}", c) for c in classes.class_ids)
        assert not seen & set(classes.class_ids)  # splits share no class
        seen |= set(classes.class_ids)


def test_pickles_have_the_authors_fields_and_key_format(data_path):
    path = embeddings.split_path(data_path, "synthetic", "center", "val")
    with open(path, "rb") as f:
        raw = pickle.load(f)  # our own file: a plain load is fine here
    assert set(raw) == {"embeddings", "keys", "labels"}
    assert raw["embeddings"].dtype == np.float32
    assert raw["embeddings"].shape == (1600, 640)
    assert len(raw["keys"]) == 1600 and len(raw["labels"]) == 1600
    for key in raw["keys"]:
        prefix, class_id, image_file = str(key).split("-")
        assert prefix == "synthetic"
        assert image_file.split("_")[0] == class_id
        assert re.fullmatch(r"s\d{7}_\d{5}\.png", image_file)


def test_write_is_deterministic(tmp_path):
    first = synthetic.write_synthetic(tmp_path / "a", seed=0)
    second = synthetic.write_synthetic(tmp_path / "b", seed=0)
    other = synthetic.write_synthetic(tmp_path / "c", seed=1)
    for split in SPLITS:
        name = f"center/{split}_embeddings.pkl"
        assert (first / name).read_bytes() == (second / name).read_bytes()
        assert (first / name).read_bytes() != (other / name).read_bytes()


def test_default_seed_matches_the_shared_copy(tmp_path, data_path):
    fresh = synthetic.write_synthetic(tmp_path, seed=0)
    shared = data_path / "synthetic"
    for split in SPLITS:
        name = f"center/{split}_embeddings.pkl"
        assert (fresh / name).read_bytes() == (shared / name).read_bytes()


def test_ensure_reuses_an_existing_copy(tmp_path):
    dataset_dir = synthetic.ensure_synthetic(tmp_path)
    assert dataset_dir == tmp_path / "synthetic"
    train = dataset_dir / "center" / "train_embeddings.pkl"
    before = train.stat().st_mtime_ns
    os.utime(train, ns=(before - 10**9, before - 10**9))
    assert synthetic.ensure_synthetic(tmp_path) == dataset_dir
    assert train.stat().st_mtime_ns == before - 10**9  # not rewritten


def test_ensure_is_safe_when_callers_race(tmp_path):
    results, errors = [], []

    def call():
        try:
            results.append(synthetic.ensure_synthetic(tmp_path))
        except Exception as e:  # pylint: disable=broad-except
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == [tmp_path / "synthetic"] * 3
    # One complete copy, no staging folders left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]
    assert load(tmp_path, "test").num_classes == 20


def test_ensure_refuses_a_foreign_or_partial_folder(tmp_path):
    (tmp_path / "synthetic" / "center").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        synthetic.ensure_synthetic(tmp_path)
    message = str(info.value)
    assert "generator.json" in message and "Delete" in message

    synthetic.ensure_synthetic(tmp_path / "ok")
    val = tmp_path / "ok" / "synthetic" / "center" / "val_embeddings.pkl"
    val.unlink()
    with pytest.raises(DataError, match="val_embeddings.pkl: file not found, in"):
        synthetic.ensure_synthetic(tmp_path / "ok")
    val.mkdir()
    with pytest.raises(DataError) as info:
        synthetic.ensure_synthetic(tmp_path / "ok")
    assert str(info.value).startswith(
        f"{val}: expected a file, found a directory, in an existing synthetic "
        "data set. Delete "
    )


def test_default_data_path(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert synthetic.default_data_path() == tmp_path / "leo_tf" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert synthetic.default_data_path() == (
        tmp_path / "home" / ".cache" / "leo_tf" / "data"
    )


# ---------------------------------------------------------------------------
# A data path that cannot take the data set.


def test_data_path_that_is_a_file_is_named(tmp_path):
    a_file = tmp_path / "data"
    a_file.write_text("not a folder")
    for data_path in (a_file, a_file / "below"):
        with pytest.raises(DataError) as info:
            synthetic.ensure_synthetic(data_path)
        assert str(info.value) == (
            f"--data_path={data_path}: cannot write the synthetic data set there: "
            f"{a_file} is a file, not a directory; nothing was written"
        )
    assert a_file.read_text() == "not a folder"


def test_unwritable_data_path_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    with run_fixtures.read_only(tmp_path / "data") as data_path:
        with pytest.raises(DataError) as info:
            synthetic.ensure_synthetic(data_path)
        reason = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"
        assert str(info.value) == (
            f"--data_path={data_path}: cannot write the synthetic data set there: "
            f"{data_path} is not writable ({reason}); nothing was written"
        )
        assert not os.listdir(data_path)


def test_disk_full_while_writing_leaves_nothing_and_the_next_call_writes_it(
    tmp_path, monkeypatch
):
    real_dump = pickle.dump
    calls = []

    def dump_until_the_disk_is_full(contents, file, protocol):
        calls.append(file.name)
        if len(calls) == 2:
            file.write(b"half a pickle")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_dump(contents, file, protocol=protocol)

    monkeypatch.setattr(synthetic.pickle, "dump", dump_until_the_disk_is_full)
    data_path = tmp_path / "data"
    with pytest.raises(DataError) as info:
        synthetic.ensure_synthetic(data_path)
    assert str(info.value) == (
        f"--data_path={data_path}: cannot write the synthetic data set there: "
        "No space left on device (the data set needs 26 MB); nothing was written"
    )
    assert len(calls) == 2 and os.listdir(data_path) == []

    monkeypatch.setattr(synthetic.pickle, "dump", real_dump)
    synthetic.ensure_synthetic(data_path)
    assert load(data_path, "val").num_classes == 16
    assert os.listdir(data_path) == ["synthetic"]


# ---------------------------------------------------------------------------
# Calibration: weak for a raw-embedding baseline, easy for a learned linear
# projection, so meta-learning has something to learn.


def test_raw_nearest_class_mean_baseline_is_in_band(data_path):
    mean, ci95 = synthetic.nearest_class_mean_accuracy(
        load(data_path, "test"), num_tr_examples_per_class=1, num_episodes=400
    )
    assert 0.35 <= mean <= 0.60
    assert 0 < ci95 < 0.02


def test_projection_learned_on_train_classes_is_far_better(data_path):
    lda = synthetic.fit_lda_projection(load(data_path, "train"))
    assert lda.shape == (640, synthetic.SIGNAL_DIM)
    mean, _ = synthetic.nearest_class_mean_accuracy(
        load(data_path, "test"),
        num_tr_examples_per_class=1,
        num_episodes=300,
        projection=lda,
    )
    assert mean >= 0.85


def test_oracle_signal_subspace_is_far_better(data_path):
    mean, _ = synthetic.nearest_class_mean_accuracy(
        load(data_path, "test"),
        num_tr_examples_per_class=1,
        num_episodes=300,
        projection=synthetic.signal_basis(seed=0),
    )
    assert mean >= 0.85


def test_random_projection_does_not_help(data_path):
    # The learned projection's gain is not an artefact of projecting as such.
    rng = np.random.default_rng(0)
    random_basis, _ = np.linalg.qr(rng.standard_normal((640, 32)))
    mean, _ = synthetic.nearest_class_mean_accuracy(
        load(data_path, "test"),
        num_tr_examples_per_class=1,
        num_episodes=300,
        projection=random_basis.astype(np.float32),
    )
    assert mean < 0.60


def test_nearest_class_mean_is_perfect_on_separated_classes():
    # Independent check of the baseline code: classes that are far apart
    # with tiny noise are always classified correctly.
    rng = np.random.default_rng(0)
    centres = np.eye(16)[:8] * 10
    classes = embeddings.ClassEmbeddings(
        "mem",
        {f"c{i}": centres[i] + 0.01 * rng.standard_normal((20, 16)) for i in range(8)},
    )
    mean, ci95 = synthetic.nearest_class_mean_accuracy(classes, num_episodes=50)
    assert mean == 1.0 and ci95 == 0.0


@pytest.mark.slow
def test_command_line_writes_and_prints_the_baselines(tmp_path):
    result = run_fixtures.run_module(
        "leo_tf.data.synthetic", f"--data_path={tmp_path}", "--num_episodes=50"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert pathlib.Path(
        tmp_path, "synthetic", "center", "test_embeddings.pkl"
    ).is_file()
    figures = re.findall(
        r"5-way (\d)-shot test accuracy, cosine nearest class mean, "
        r"(raw embeddings|LDA fitted on train|true signal subspace): "
        r"([\d.]+) \+- ([\d.]+)%",
        result.stdout,
    )
    assert [(shots, name) for shots, name, _, _ in figures] == [
        ("1", "raw embeddings"),
        ("5", "raw embeddings"),
        ("1", "LDA fitted on train"),
        ("5", "LDA fitted on train"),
        ("1", "true signal subspace"),
        ("5", "true signal subspace"),
    ]
    raw_1shot, lda_1shot = float(figures[0][2]), float(figures[2][2])
    assert 35 <= raw_1shot <= 60
    assert lda_1shot >= 85
