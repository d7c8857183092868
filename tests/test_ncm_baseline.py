"""Tests of benchmarks/ncm_baseline.py (the cosine nearest-class-mean script)."""

import importlib.util
import pathlib
import pickle

import numpy as np

SCRIPT = (
    pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / ("ncm_baseline.py")
)


def load_script():
    spec = importlib.util.spec_from_file_location("ncm_baseline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ncm_is_perfect_on_separable_classes_and_chance_on_identical_ones(tmp_path):
    ncm = load_script()
    rng = np.random.default_rng(0)
    # Class c's examples point along axis c (plus small noise): NCM is exact.
    separable = [np.eye(8)[c] + 0.01 * rng.random((20, 8)) for c in range(8)]
    accuracies = [
        ncm.episode_accuracy([ncm.normalise(x) for x in separable], 5, 1, rng)
        for _ in range(50)
    ]
    assert accuracies == [1.0] * 50
    # All classes identical: every query ties and argmax picks label 0, so the
    # accuracy is the share of label-0 queries, exactly 1/N.
    identical = [np.ones((20, 8)) for _ in range(8)]
    assert ncm.episode_accuracy(identical, 4, 5, rng) == 0.25


def test_ncm_reads_classes_from_the_key_middle_field(tmp_path):
    ncm = load_script()
    keys = np.array(
        [
            "d-dC0001-dC0001_0000.png",
            "d-dC0000-dC0000_0000.png",
            "d-dC0001-dC0001_0001.png",
        ]
    )
    embeddings = np.arange(6, dtype=np.float32).reshape(3, 2)
    path = tmp_path / "test_embeddings.pkl"
    path.write_bytes(
        pickle.dumps(
            {"embeddings": embeddings, "keys": keys, "labels": np.array([1, 0, 1])}
        )
    )
    classes = ncm.load_classes(str(path))
    assert list(classes) == ["dC0000", "dC0001"]
    np.testing.assert_array_equal(classes["dC0001"], embeddings[[0, 2]])
