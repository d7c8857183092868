"""The pre-drawn noise of a meta-training step (leo_tf/noise.py).

The random words are checked against SplitMix64 written here in NumPy, and
every noise tensor against its transform of those words computed in NumPy.
"""

import math

import numpy as np
import tensorflow as tf

from leo_tf import noise as noise_lib
from leo_tf.config import MIN_DROPOUT_RATE

_MASK = np.uint64(2**64 - 1)


def _mix64(z):
    """SplitMix64's output function (Steele et al. 2014), NumPy uint64."""
    z = np.asarray(z, np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _words(seed, first, count):
    """Words first .. first + count - 1 of the stream of a [2] int seed."""
    s0, s1 = (np.array([x], np.int64).view(np.uint64) for x in seed)
    key = _mix64(_mix64(s0) ^ s1)
    counters = np.arange(first + 1, first + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix64(key + counters * np.uint64(0x9E3779B97F4A7C15))


def _tf_words(seed, first, count):
    return noise_lib.random_words(noise_lib.stream_key(seed), first, count)


def _expected_mask(words, size, rate):
    quarters = (words[:, None] >> np.uint64([0, 16, 32, 48])) & np.uint64(0xFFFF)
    draws = quarters.reshape(-1)[:size]
    return np.where(draws >= round(rate * 2**16), 1 / (1 - rate), 0.0)


def _expected_normals(words, size, bits):
    def uniform(halves):
        return ((halves >> np.uint64(32 - bits)).astype(np.float64) + 0.5) / 2**bits

    radius = np.sqrt(-2.0 * np.log(uniform(words & np.uint64(2**32 - 1))))
    angle = 2.0 * np.pi * uniform(words >> np.uint64(32))
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]


def _normal_cdf(x):
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def test_random_words_are_splitmix64_of_the_counters():
    for seed in ([0, 0], [11, -3], [2**31 - 3, 99_999]):
        actual = _tf_words(tf.constant(seed, tf.int64), 5, 300).numpy()
        np.testing.assert_array_equal(actual, _words(seed, 5, 300))
    # Seed (0, 0) has key 0: SplitMix64 seeded with 0, whose first outputs
    # are the published test vector.
    first_three = _tf_words(tf.constant([0, 0], tf.int64), 0, 3).numpy()
    assert [int(w) for w in first_three] == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
        0x06C45D188009454F,
    ]


def test_keep_mask_compares_16_bit_quarters_of_the_words():
    shape, rate = [3, 5, 7], 0.3  # 105 elements: not a multiple of 4
    words = _words([4, 2], 0, noise_lib.mask_words(105))
    expected = _expected_mask(words, 105, rate).reshape(shape)
    actual = noise_lib.keep_mask(shape, tf.constant(words), rate, tf.float64)
    np.testing.assert_array_equal(actual.numpy(), expected)


def test_standard_normal_is_the_box_muller_transform_of_the_words():
    shape = [3, 5, 7]  # 105: an odd count
    words = _words([4, 2], 0, noise_lib.normal_words(105))
    for dtype, bits, tolerance in ((tf.float64, 32, 1e-12), (tf.float32, 24, 1e-5)):
        expected = _expected_normals(words, 105, bits).reshape(shape)
        actual = noise_lib.standard_normal(shape, tf.constant(words), dtype)
        assert actual.dtype == dtype
        np.testing.assert_allclose(
            actual.numpy(), expected, rtol=tolerance, atol=tolerance
        )


def test_standard_normal_samples_are_standard_normal_and_uncorrelated():
    n = 200_001
    words = _tf_words(tf.constant([7, 7], tf.int64), 0, noise_lib.normal_words(n))
    samples = noise_lib.standard_normal([n], words).numpy().astype(np.float64)
    assert samples.shape == (n,) and np.all(np.isfinite(samples))
    # Bounded by the radius of the smallest 24-bit uniform, 2^-25.
    assert np.abs(samples).max() < math.sqrt(50 * math.log(2))
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
    half = noise_lib.normal_words(n) - 1
    correlation = np.corrcoef(samples[:half], samples[half + 1 : 2 * half + 1])[0, 1]
    assert abs(correlation) < 4 / math.sqrt(half)


def _mask(size, seed, rate):
    words = _tf_words(tf.constant(seed, tf.int64), 0, noise_lib.mask_words(size))
    return noise_lib.keep_mask([size], words, rate).numpy()


def test_keep_mask_drop_probability_and_edge_rates():
    mask = _mask(400_000, [9, 1], 0.3)
    assert set(np.unique(mask)) == {0.0, np.float32(1 / 0.7)}
    dropped = np.mean(mask == 0)
    assert abs(dropped - 19661 / 65536) < 4 * math.sqrt(0.3 * 0.7 / mask.size)
    # Each of a word's four decisions drops at the same rate.
    for quarter in range(4):
        share = np.mean(mask[quarter::4] == 0)
        assert abs(share - 19661 / 65536) < 4 * math.sqrt(0.3 * 0.7 / 100_000)
    # Rate 0 keeps everything; the smallest rate drops one level in 2^16; a
    # rate within 2^-17 of 1 still keeps one level.
    assert np.all(_mask(1000, [1, 1], 0.0) == 1.0)
    rare = _mask(2_000_000, [2, 1], MIN_DROPOUT_RATE)
    assert 0 < np.sum(rare == 0) < 2_000_000 / 65536 * 2
    almost_all = _mask(2_000_000, [3, 1], 1 - 2**-18)
    assert 0 < np.sum(almost_all > 0) < 2_000_000 / 65536 * 2


_DRAW_KWARGS = dict(
    num_latents=4, inner_unroll_length=2, finetuning_unroll_length=3, dropout_rate=0.25
)
_SUPPORT, _QUERY = [6, 5, 3, 40], [6, 5, 7, 40]


def test_draw_noise_shapes_masks_and_seeds():
    noise = noise_lib.draw_noise([1, 2], _SUPPORT, _QUERY, **_DRAW_KWARGS)
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
    again = noise_lib.draw_noise([1, 2], _SUPPORT, _QUERY, **_DRAW_KWARGS)
    other = noise_lib.draw_noise([1, 3], _SUPPORT, _QUERY, **_DRAW_KWARGS)
    for same, field, different in zip(noise, again, other):
        np.testing.assert_array_equal(same.numpy(), field.numpy())
        assert not np.array_equal(same.numpy(), different.numpy())
    # The per-step draws of the weights differ from step to step.
    assert not np.allclose(noise.weights[0].numpy(), noise.weights[1].numpy())


def test_draw_noise_fields_are_consecutive_word_ranges_of_one_stream():
    # The compiled draw against NumPy: each field is its transform of its own
    # range of the stream's words, the ranges back to back from word 0.
    seed = [5, 123]
    noise = noise_lib.draw_noise(seed, _SUPPORT, _QUERY, **_DRAW_KWARGS)
    first = 0
    for field, tensor in zip(noise._fields, noise):
        size = tensor.numpy().size
        if field.endswith("dropout"):
            count = noise_lib.mask_words(size)
            expected = _expected_mask(_words(seed, first, count), size, 0.25)
            np.testing.assert_array_equal(
                tensor.numpy().ravel(), expected.astype(np.float32)
            )
        else:
            count = noise_lib.normal_words(size)
            expected = _expected_normals(_words(seed, first, count), size, 24)
            np.testing.assert_allclose(
                tensor.numpy().ravel(), expected, rtol=1e-5, atol=1e-5
            )
        first += count
    shapes = noise_lib.noise_shapes(
        _SUPPORT,
        _QUERY,
        num_latents=4,
        inner_unroll_length=2,
        finetuning_unroll_length=3,
    )
    assert sum(count for _, count in noise_lib.word_ranges(shapes)) == first


def test_consecutive_steps_share_no_random_words():
    count = 50_000
    step_words = [_words([7, step], 0, count) for step in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.intersect1d(step_words[a], step_words[b]).size == 0
