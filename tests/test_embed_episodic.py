"""Tests of the episodic fine-tuning stage of the embedding (embedding/episodic.py).

All on tiny generated images and a 4-filter conv4; a few seconds in all.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from leo_tf import config as config_lib
from leo_tf.embedding import episodic
from leo_tf.embedding import options
from leo_tf.embedding import pipeline
from leo_tf.embedding import pretrain
from tests import test_embed


def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_prototype_logits_are_scaled_cosines_to_mean_unit_support_features():
    rng = np.random.default_rng(0)
    ways, shots, queries, dim, scale = 3, 2, 4, 5, 7.5
    features = rng.normal(size=(ways * (shots + queries), dim)).astype(np.float32)

    logits = episodic.prototype_logits(
        tf.constant(features), ways, shots, tf.constant(scale)
    ).numpy()

    per_class = features.reshape(ways, shots + queries, dim)
    prototypes = unit_rows(unit_rows(per_class[:, :shots]).mean(axis=1))
    query_rows = unit_rows(per_class[:, shots:].reshape(ways * queries, dim))
    expected = np.array(
        [[scale * float(q @ p) for p in prototypes] for q in query_rows]
    )
    assert logits.shape == (ways * queries, ways)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_episodes_draw_distinct_classes_and_distinct_images_of_each():
    labels = np.repeat(np.arange(6), [4, 5, 6, 4, 7, 5])
    class_rows = episodic.rows_by_class(labels, 6)
    rng = np.random.default_rng(3)
    drawn_classes = set()
    for _ in range(50):
        rows = episodic.sample_episode(rng, class_rows, ways=4, per_class=3)
        assert rows.shape == (4, 3)
        assert len(set(rows.ravel().tolist())) == 12
        row_classes = labels[rows]
        assert np.all(row_classes == row_classes[:, :1])  # one class per row
        assert len(set(row_classes[:, 0].tolist())) == 4
        drawn_classes.update(row_classes[:, 0].tolist())
    assert drawn_classes == set(range(6))
    again = episodic.sample_episode(np.random.default_rng(3), class_rows, 4, 3)
    first = episodic.sample_episode(np.random.default_rng(3), class_rows, 4, 3)
    np.testing.assert_array_equal(again, first)


def test_episodes_that_the_classes_cannot_fill_are_named_errors():
    config = options.TrainConfig(
        episodic_episodes=1, episodic_ways=5, episodic_shots=2, episodic_queries=3
    )
    with pytest.raises(episodic.EpisodeError, match=r"--episodic_ways=5: .* only 4"):
        episodic.check_episodes_fit([5, 5, 5, 5], config)
    with pytest.raises(
        episodic.EpisodeError,
        match=r"--episodic_shots=2 \+ --episodic_queries=3 = 5 .* only 4",
    ):
        episodic.check_episodes_fit([5, 5, 4, 5, 5], config)
    episodic.check_episodes_fit([5] * 5, config)  # fits: no error


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("episodic_episodes", -1, "must be at least 0"),
        ("episodic_ways", 1, "must be at least 2"),
        ("episodic_shots", 0, "must be at least 1"),
        ("episodic_queries", 0, "must be at least 1"),
        ("episodic_learning_rate", 0.0, "must be a finite number > 0"),
        ("episodic_scale", float("nan"), "must be a finite number > 0"),
    ],
)
def test_bad_episodic_options_are_rejected_by_name(field, value, problem):
    with pytest.raises(config_lib.ConfigError, match=rf"--{field}={value}: {problem}"):
        config_lib.check(options.TrainConfig(**{field: value}))


def separable_images(num_classes, per_class, seed=0):
    """uint8 [num_classes * per_class, 16, 16, 1] noisy class templates, labels."""
    rng = np.random.default_rng(seed)
    templates = rng.random((num_classes, 16, 16, 1)) < 0.3
    noise = rng.random((num_classes, per_class, 16, 16, 1)) < 0.05
    images = np.where(templates[:, None] ^ noise, 0, 255).astype(np.uint8)
    labels = np.repeat(np.arange(num_classes), per_class)
    return images.reshape(-1, 16, 16, 1), labels


def test_finetuning_trains_the_extractor_and_scale_and_lowers_the_loss():
    images, labels = separable_images(num_classes=6, per_class=6)
    config = options.TrainConfig(
        conv_filters=4,
        augment_shift=0.0,
        augment_rotation=0.0,
        episodic_episodes=40,
        episodic_ways=4,
        episodic_shots=1,
        episodic_queries=3,
        episodic_learning_rate=1e-2,
    )
    mean, variance = pretrain.pixel_statistics(images)
    extractor = pretrain.build_feature_extractor(config, (16, 16, 1), mean, variance)
    before = [w.copy() for w in extractor.get_weights()]

    history = episodic.finetune(extractor, images, labels, 6, config)

    assert len(history["episode_loss"]) == 10  # one entry per 4 episodes
    assert history["episode_loss"][-1] < history["episode_loss"][0]
    assert history["scale"][-1] != config.episodic_scale
    changed = [
        not np.array_equal(a, b) for a, b in zip(before, extractor.get_weights())
    ]
    assert all(changed)  # conv kernels, batch-norm weights and statistics


@pytest.mark.slow
def test_pipeline_runs_episodes_only_when_asked_and_checks_them_first(
    fake_omniglot, tmp_path, monkeypatch
):
    source = {"packed_omniglot": str(fake_omniglot[0])}
    calls = []
    original = episodic.finetune

    def recording_finetune(extractor, images, labels, classes, config):
        calls.append((len(images), classes))
        return original(extractor, images, labels, classes, config)

    monkeypatch.setattr(episodic, "finetune", recording_finetune)
    default = test_embed.tiny_config(tmp_path / "default", **source)
    result = pipeline.run(default)
    assert calls == [] and "episodic" not in result.seconds
    assert "episode_loss" not in result.history

    episodes = config_with_episodes(default, tmp_path / "episodic", ways=3)
    result = pipeline.run(episodes)
    assert calls == [(40, 8)]  # 8 train characters x 5 drawings
    assert len(result.history["episode_loss"]) == 2
    assert "episodic" in result.seconds

    def no_training(*args):
        raise AssertionError("trained before checking the episodes")

    monkeypatch.setattr(pretrain, "train_classifier", no_training)
    too_wide = config_with_episodes(default, tmp_path / "too_wide", ways=9)
    with pytest.raises(episodic.EpisodeError, match="--episodic_ways=9"):
        pipeline.run(too_wide)
    assert not (tmp_path / "too_wide").exists()


def test_zero_epochs_leave_the_training_to_the_episodes(fake_omniglot, tmp_path):
    default = test_embed.tiny_config(tmp_path, packed_omniglot=str(fake_omniglot[0]))
    config = config_with_episodes(default, tmp_path / "out", ways=3)
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, epochs=0)
    )
    result = pipeline.run(config)
    assert result.history["loss"] == [] and result.history["accuracy"] == []
    assert len(result.history["episode_loss"]) == 2
    for split in ("train", "val", "test"):
        test_embed.check_split_pickle(result.splits[split].path, "omniglot", 4)


def config_with_episodes(config, data_path, ways):
    """`config` writing to data_path, with 2 fine-tuning episodes of `ways`."""
    train = dataclasses.replace(
        config.train, episodic_episodes=2, episodic_ways=ways, episodic_queries=2
    )
    return dataclasses.replace(
        config, train=train, output=options.OutputConfig(str(data_path))
    )


fake_omniglot = test_embed.fake_omniglot
