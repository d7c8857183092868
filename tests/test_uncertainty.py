"""Predictive uncertainty from sampled adaptations: noise, samples, summaries, ECE."""

import numpy as np
import pytest
import tensorflow as tf

from leo_tf import uncertainty
from leo_tf.config import ModelConfig
from leo_tf.model import LEO

DIM, CLASSES, SHOTS, QUERIES = 8, 3, 2, 5


@pytest.fixture(scope="module")
def model():
    return LEO(
        ModelConfig(num_latents=4, inner_unroll_length=2, finetuning_unroll_length=2),
        DIM,
        seed=3,
    )


def _task(seed):
    rng = np.random.default_rng(seed)
    support = rng.normal(size=(CLASSES, SHOTS, DIM))
    query = rng.normal(size=(QUERIES, DIM))
    support /= np.linalg.norm(support, axis=-1, keepdims=True)
    query /= np.linalg.norm(query, axis=-1, keepdims=True)
    return tf.constant(support, tf.float32), tf.constant(query, tf.float32)


def _deterministic_probabilities(model, support, query):
    labels = np.broadcast_to(np.arange(CLASSES)[:, None, None], (CLASSES, SHOTS, 1))
    adaptation = model.adapt(support[None], labels[None].astype(np.int32))
    logits = model.predict(query[None, None], adaptation.class_weights)[0, 0]
    return tf.nn.softmax(logits).numpy()


def test_noise_shapes_and_determinism(model):
    latent, weights = uncertainty.draw_adaptation_noise(
        model, [CLASSES, SHOTS, DIM], 7, tf.constant(11, tf.int64)
    )
    assert latent.shape == (7, CLASSES, SHOTS, 4)
    assert weights.shape == (3, 7, CLASSES, SHOTS, DIM)  # inner steps + 1 decodes
    again = uncertainty.draw_adaptation_noise(model, [CLASSES, SHOTS, DIM], 7, 11)
    other = uncertainty.draw_adaptation_noise(model, [CLASSES, SHOTS, DIM], 7, 12)
    np.testing.assert_array_equal(latent, again[0])
    np.testing.assert_array_equal(weights, again[1])
    assert not np.allclose(latent, other[0])
    # Standard normals: loose moment checks on all the draws.
    values = np.concatenate([latent.numpy().ravel(), weights.numpy().ravel()])
    assert abs(values.mean()) < 0.15 and abs(values.std() - 1) < 0.15


def test_zero_noise_gives_the_deterministic_answer_in_every_sample(model):
    support, query = _task(0)
    latent_shape, weight_shape = uncertainty.adaptation_noise_shapes(
        model, support.shape, 4
    )
    probabilities = uncertainty.sampled_probabilities(
        model, support, query, tf.zeros(latent_shape), tf.zeros(weight_shape)
    )
    expected = _deterministic_probabilities(model, support, query)
    assert probabilities.shape == (4, QUERIES, CLASSES)
    for sample in probabilities.numpy():
        np.testing.assert_allclose(sample, expected, rtol=1e-5, atol=1e-6)


def test_each_sample_is_the_adaptation_with_its_own_noise(model):
    """S samples at once equal S separate adaptations with their noise slices."""
    support, query = _task(1)
    latent, weights = uncertainty.draw_adaptation_noise(model, support.shape, 3, 5)
    together = uncertainty.sampled_probabilities(model, support, query, latent, weights)
    deterministic = _deterministic_probabilities(model, support, query)
    for s in range(3):
        alone = uncertainty.sampled_probabilities(
            model, support, query, latent[s : s + 1], weights[:, s : s + 1]
        )
        np.testing.assert_allclose(together[s], alone[0], rtol=1e-5, atol=1e-6)
        # The noise matters: a sample is not the deterministic answer.
        assert np.abs(together[s].numpy() - deterministic).max() > 1e-4


def test_summary_against_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, 4, 3))
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    probabilities[0, 0] = [1.0, 0.0, 0.0]  # a zero probability: 0 log 0 = 0
    summary = uncertainty.summarise(tf.constant(probabilities))
    mean = probabilities.mean(0)
    np.testing.assert_allclose(summary["mean_probabilities"], mean, rtol=1e-12)
    np.testing.assert_allclose(
        summary["probability_stddev"], probabilities.std(0), rtol=1e-10
    )
    safe = np.where(mean > 0, mean, 1.0)
    entropy = -np.sum(mean * np.log(safe), axis=-1)
    np.testing.assert_allclose(summary["predictive_entropy"], entropy, rtol=1e-10)
    certain = uncertainty.summarise(tf.constant([[[0.0, 1.0]], [[0.0, 1.0]]]))
    assert certain["predictive_entropy"].numpy()[0] == 0.0


def test_expected_calibration_error_by_hand():
    # Confidences 0.9, 0.9 (bin 13 of 15), 0.6, 0.6, 0.65 (bin 9).
    probabilities = np.array(
        [[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.35, 0.65]]
    )
    labels = np.array([0, 1, 1, 1, 1])
    # bin 13: accuracy 1/2, confidence 0.9 -> 0.4 * 2/5
    # bin 9: queries 2, 3, 4: accuracy 2/3, confidence (0.6+0.6+0.65)/3
    expected = 0.4 * 2 / 5 + abs(2 / 3 - 1.85 / 3) * 3 / 5
    assert uncertainty.expected_calibration_error(
        probabilities, labels
    ) == pytest.approx(expected, abs=1e-12)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert uncertainty.expected_calibration_error(perfect, np.array([0, 1])) == 0.0
