"""The pre-drawn noise of a meta-training step (leo_tf/noise.py)."""

import math

import numpy as np
import tensorflow as tf

from leo_tf import noise as noise_lib
from leo_tf.config import MIN_DROPOUT_RATE


def _normal_cdf(x):
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def test_standard_normal_is_the_box_muller_transform_of_its_uniforms():
    shape, seed = [3, 5, 7], tf.constant([4, 2], tf.int64)  # 105: an odd count
    uniform = tf.random.stateless_uniform(
        [2, 53], seed, dtype=tf.float64, alg="philox"
    ).numpy()
    radius = np.sqrt(-2.0 * np.log(1.0 - uniform[0]))
    angle = 2.0 * np.pi * uniform[1]
    pairs = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
    expected = pairs[:105].reshape(shape)
    actual = noise_lib.standard_normal(shape, seed, tf.float64).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


def test_unit_uniform_equals_stateless_uniform_bit_for_bit():
    # The raw op skips the public function's * 1 + 0; nothing else may change.
    for dtype in (tf.float32, tf.float64):
        seed = tf.constant([11, -3], tf.int64)
        expected = tf.random.stateless_uniform(
            [4, 999], seed, dtype=dtype, alg="philox"
        )
        actual = noise_lib._stateless_unit_uniform([4, 999], seed, dtype)
        assert actual.dtype == dtype
        np.testing.assert_array_equal(actual.numpy(), expected.numpy())


def test_standard_normal_samples_are_standard_normal_and_uncorrelated():
    samples = noise_lib.standard_normal([200_001], [7, 7]).numpy().astype(np.float64)
    assert samples.shape == (200_001,) and np.all(np.isfinite(samples))
    n = samples.size
    # Moments, each within about 4 standard errors of N(0, 1)'s.
    assert abs(samples.mean()) < 4 / math.sqrt(n)
    assert abs(samples.var() - 1.0) < 4 * math.sqrt(2 / n)
    assert abs(np.mean(samples**3)) < 4 * math.sqrt(15 / n)
    assert abs(np.mean(samples**4) - 3.0) < 4 * math.sqrt(96 / n)
    # Kolmogorov-Smirnov distance to N(0, 1) below its 1% critical value.
    ordered = np.sort(samples)
    cdf = _normal_cdf(ordered)
    ecdf_high = np.arange(1, n + 1) / n
    distance = max(np.max(ecdf_high - cdf), np.max(cdf - (ecdf_high - 1 / n)))
    assert distance < 1.63 / math.sqrt(n)
    # The cos and sin halves of the Box-Muller pairs are independent.
    half = n // 2
    correlation = np.corrcoef(samples[:half], samples[half : 2 * half])[0, 1]
    assert abs(correlation) < 4 / math.sqrt(half)


def test_keep_mask_compares_16_bit_halves_of_the_philox_words():
    shape, seed, rate = [3, 5, 7], tf.constant([4, 2], tf.int64), 0.3  # 105: odd
    words = tf.random.stateless_uniform(
        [53], seed, dtype=tf.uint32, minval=None, maxval=None, alg="philox"
    ).numpy()
    halves = words.astype("<u4").view("<u2")[:105]  # low half, then high half
    threshold = 19661  # round(0.3 * 65536)
    expected = np.where(halves >= threshold, 1 / 0.7, 0.0).reshape(shape)
    actual = noise_lib.keep_mask(shape, seed, rate, tf.float64).numpy()
    np.testing.assert_array_equal(actual, expected)


def test_keep_mask_drop_probability_and_edge_rates():
    mask = noise_lib.keep_mask([400_000], [9, 1], 0.3).numpy()
    assert set(np.unique(mask)) == {0.0, np.float32(1 / 0.7)}
    dropped = np.mean(mask == 0)
    assert abs(dropped - 19661 / 65536) < 4 * math.sqrt(0.3 * 0.7 / mask.size)
    # Rate 0 keeps everything; the smallest rate drops one level in 2^16; a
    # rate within 2^-17 of 1 still keeps one level.
    assert np.all(noise_lib.keep_mask([1000], [1, 1], 0.0).numpy() == 1.0)
    rare = noise_lib.keep_mask([2_000_000], [2, 1], MIN_DROPOUT_RATE)
    assert 0 < np.sum(rare.numpy() == 0) < 2_000_000 / 65536 * 2
    almost_all = noise_lib.keep_mask([2_000_000], [3, 1], 1 - 2**-18).numpy()
    assert 0 < np.sum(almost_all > 0) < 2_000_000 / 65536 * 2


def test_draw_noise_shapes_masks_and_seeds():
    kwargs = dict(
        num_latents=4,
        inner_unroll_length=2,
        finetuning_unroll_length=3,
        dropout_rate=0.25,
    )
    noise = noise_lib.draw_noise([1, 2], [6, 5, 3, 40], [6, 5, 7, 40], **kwargs)
    assert noise.encoder_dropout.shape == (6, 5, 3, 40)
    assert noise.latent.shape == (6, 5, 3, 4)
    assert noise.weights.shape == (3, 6, 5, 3, 40)
    assert noise.support_dropout.shape == (5, 6, 5, 3, 40)
    assert noise.query_dropout.shape == (6, 5, 7, 40)
    for mask in (noise.encoder_dropout, noise.support_dropout, noise.query_dropout):
        values = mask.numpy()
        assert set(np.unique(values)) == {0.0, np.float32(1 / 0.75)}
        assert abs(np.mean(values > 0) - 0.75) < 4 * math.sqrt(
            0.75 * 0.25 / values.size
        )
    again = noise_lib.draw_noise([1, 2], [6, 5, 3, 40], [6, 5, 7, 40], **kwargs)
    other = noise_lib.draw_noise([1, 3], [6, 5, 3, 40], [6, 5, 7, 40], **kwargs)
    for same, field, different in zip(noise, again, other):
        np.testing.assert_array_equal(same.numpy(), field.numpy())
        assert not np.array_equal(same.numpy(), different.numpy())
    # The per-step draws of the weights differ from step to step.
    assert not np.allclose(noise.weights[0].numpy(), noise.weights[1].numpy())
