"""The samplers of a run's splits, from a DataConfig, on the toy set.

The toy set (data_fixtures): 12 / 6 / 6 classes of 24 examples, D = 16.
"""

import dataclasses
import logging
import pickle

import numpy as np
import pytest

from leo_tf import config as config_lib
from leo_tf.data import embeddings, meta_dataset
from tests import data_fixtures


def _config(data_path, **values):
    batch_sizes = dict(
        metatrain_batch_size=4, metavalid_batch_size=3, metatest_batch_size=2
    )
    return config_lib.DataConfig(
        data_path=str(data_path), dataset_name="toy", **{**batch_sizes, **values}
    )


def _episode_rows(batch, classes):
    """The set of (class, example) pairs of each episode's support and query
    sets, found as the examples of the split they are normalised copies of.
    [B] sets"""
    names, units = [], []
    for name, array in classes.embeddings.items():
        names += [(name, index) for index in range(len(array))]
        units.append(array / np.linalg.norm(array, axis=-1, keepdims=True))
    units = np.concatenate(units)  # [total, D]
    episodes = []
    for b in range(batch.tr_input.shape[0]):
        rows = np.concatenate(
            [
                batch.tr_input[b].reshape(-1, units.shape[1]),
                batch.val_input[b].reshape(-1, units.shape[1]),
            ]
        )
        cosines = rows @ units.T  # [rows, total]
        np.testing.assert_allclose(cosines.max(axis=1), 1.0, rtol=1e-5)
        episodes.append({names[index] for index in cosines.argmax(axis=1)})
    return episodes


def test_load_classes_reads_the_split(toy_data):
    classes = meta_dataset.load_classes(_config(toy_data), "val")
    assert classes.num_classes == 6 and classes.embedding_dim == 16
    assert classes.examples_per_class == (24,) * 6
    assert all(name.startswith("nva") for name in classes.embeddings)


def test_published_data_sets_must_be_640_wide_others_any_width(tmp_path):
    data_fixtures.write_toy_dataset(tmp_path, name="miniImageNet", dim=16)
    config = dataclasses.replace(_config(tmp_path), dataset_name="miniImageNet")
    with pytest.raises(embeddings.DataError, match="expected width D=640, .*16"):
        meta_dataset.load_classes(config, "train")
    assert (
        meta_dataset.load_classes(config, "train", embedding_dim=16).num_classes == 12
    )


def test_train_sampler_draws_metatrain_batches_of_training_classes(toy_data):
    config = _config(toy_data, num_tr_examples_per_class=2)
    classes = meta_dataset.load_classes(config, "train")
    sampler = meta_dataset.train_sampler(config, classes, seed=3)
    batch = sampler.sample(0)
    assert batch.tr_input.shape == (4, 5, 2, 16)
    assert batch.val_input.shape == (4, 5, 15, 16)  # num_val_examples_per_class
    for rows in _episode_rows(batch, classes):
        assert len(rows) == 5 * 17  # distinct examples of 5 training classes
        assert len({name for name, _ in rows}) == 5


def test_replicas_with_another_stream_offset_draw_other_episodes(toy_data):
    config = _config(toy_data)
    classes = meta_dataset.load_classes(config, "train")
    first = meta_dataset.train_sampler(config, classes, seed=3).sample(7)
    again = meta_dataset.train_sampler(config, classes, seed=3).sample(7)
    other = meta_dataset.train_sampler(config, classes, 3, stream_offset=1).sample(7)
    np.testing.assert_array_equal(first.val_input, again.val_input)
    assert not np.array_equal(first.val_input, other.val_input)


@pytest.mark.parametrize("split,batch_size", [("val", 3), ("test", 2)])
def test_eval_sampler_uses_all_remaining_examples_and_its_batch_size(
    toy_data, split, batch_size
):
    config = _config(toy_data, num_tr_examples_per_class=5)
    classes = meta_dataset.load_classes(config, split)
    batch = meta_dataset.eval_sampler(config, classes, split, seed=0).sample(0)
    assert batch.tr_input.shape == (batch_size, 5, 5, 16)
    assert batch.val_input.shape == (batch_size, 5, 24 - 5, 16)
    for rows in _episode_rows(batch, classes):
        assert len(rows) == 5 * 24  # every example of its 5 classes


def test_eval_sampler_is_capped_by_the_total_examples_per_class(toy_data):
    config = _config(toy_data, total_examples_per_class=10)
    classes = meta_dataset.load_classes(config, "val")
    batch = meta_dataset.eval_sampler(config, classes, "val", seed=0).sample(0)
    assert batch.val_input.shape == (3, 5, 9, 16)


def test_a_smaller_smallest_class_lowers_the_queries_and_says_so(tmp_path, caplog):
    data_fixtures.write_toy_dataset(tmp_path)
    path = tmp_path / "toy" / "center" / "test_embeddings.pkl"
    with open(path, "rb") as stream:
        payload = pickle.load(stream)
    keep = np.ones(len(payload["keys"]), bool)
    keep[10:24] = False  # the first class keeps 10 of its 24 examples
    payload = {name: np.asarray(value)[keep] for name, value in payload.items()}
    with open(path, "wb") as stream:
        pickle.dump(payload, stream, protocol=2)
    config = _config(tmp_path)
    classes = meta_dataset.load_classes(config, "test")
    with caplog.at_level(logging.INFO):
        sampler = meta_dataset.eval_sampler(config, classes, "test", seed=0)
    assert sampler.sample(0).val_input.shape == (2, 5, 9, 16)
    assert (
        "test split: smallest class has 10 examples, so test episodes use 9 "
        "query examples per class (all remaining after K=1), not 599"
    ) in caplog.text


def test_the_splits_draw_from_their_own_random_streams(toy_data):
    """Splits never share random numbers: on the same classes, the val and
    test samplers of one seed draw different episodes."""
    config = _config(toy_data, metavalid_batch_size=2)
    classes = meta_dataset.load_classes(config, "val")
    val = meta_dataset.eval_sampler(config, classes, "val", seed=0).sample(0)
    test = meta_dataset.eval_sampler(config, classes, "test", seed=0).sample(0)
    train = meta_dataset.train_sampler(
        dataclasses.replace(config, metatrain_batch_size=2), classes, seed=0
    ).sample(0)
    assert val.tr_input.shape == test.tr_input.shape == train.tr_input.shape
    assert not np.array_equal(val.tr_input, test.tr_input)
    assert not np.array_equal(val.tr_input, train.tr_input)
    assert not np.array_equal(test.tr_input, train.tr_input)
