"""The random numbers of a meta-training step, drawn ahead of the step.

LEO's meta-training step is stochastic in five places:
the encoder's input dropout, the latent sample, the classifier-weight sample
after every decode, the classifier's input dropout on every support-loss
evaluation, and the classifier's input dropout on the query set. Drawing all
of them up front, from one stateless seed, keeps random-number generation
out of the compiled step (it runs in the input pipeline), makes every step a
pure function of (weights, data, seed), and lets tests hold the noise fixed.

Support-loss evaluations: the latent loop evaluates the support loss once per
latent step (S of them, before each update), and the finetuning loop once per
finetuning step (F of them, the first on the weights decoded from the final
latents), so S + F dropout masks; the weights are sampled S + 1 times.

The random bits are those of SplitMix64 in counter form: word i of a stream
with key k is mix64(k + (i + 1) gamma), gamma = 0x9E3779B97F4A7C15 (Steele, Lea
and Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014;
the generator of Java's SplittableRandom, which passes TestU01's BigCrush).
A step's key is a hash of its seed; its noise tensors take consecutive,
disjoint ranges of the stream's counters. Compiled with XLA, the words, the
dropout masks and the normals' uniforms are a few fused loops of integer
arithmetic, several times cheaper on CPU than TensorFlow's Philox kernel; the
normals are then the Box-Muller transform of the uniforms (BUILD.md,
Performance).
"""

import functools
import math
from typing import NamedTuple

import tensorflow as tf

# The resolution of a dropout decision and the smallest non-zero rate it
# resolves are defined with the flags, which are checked before TensorFlow loads.
from leo_tf.config import DROPOUT_LEVELS

# SplitMix64's increment (2^64 / golden ratio, odd) and its output function's
# multipliers (Stafford's "Mix13").
GAMMA = 0x9E3779B97F4A7C15
MIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
MIX_SHIFTS = (30, 27, 31)
DECISIONS_PER_WORD = 4  # 16-bit dropout decisions in a 64-bit word
NORMALS_PER_WORD = 2  # a Box-Muller pair from a word's two 32-bit halves


class EpisodeNoise(NamedTuple):
    """Noise for a meta-batch. Dropout masks are scaled keep masks.

    The two per-step fields may also be tuples of per-step tensors (see
    `steps.meta_batch_part`); the model only indexes them by step.
    """

    encoder_dropout: tf.Tensor  # [B, N, K, D]
    latent: tf.Tensor  # [B, N, K, L], standard normal
    weights: tf.Tensor  # [S + 1, B, N, K, D], standard normal
    support_dropout: tf.Tensor  # [S + F, B, N, K, D]
    query_dropout: tf.Tensor  # [B, N, V, D]


# Which EpisodeNoise fields are dropout masks (the others are normals).
_MASK_FIELDS = ("encoder_dropout", "support_dropout", "query_dropout")


def noise_shapes(
    support_shape,
    query_shape,
    *,
    num_latents,
    inner_unroll_length,
    finetuning_unroll_length
):
    """The shape of each noise tensor of one meta-training step.

    Args:
      support_shape: [B, N, K, D], Python ints.
      query_shape: [B, N, V, D].
      num_latents: L.
      inner_unroll_length: S, latent-space adaptation steps.
      finetuning_unroll_length: F, weight-space adaptation steps.

    Returns:
      EpisodeNoise of shapes (lists of ints).
    """
    support, query = [int(x) for x in support_shape], [int(x) for x in query_shape]
    return EpisodeNoise(
        encoder_dropout=support,
        latent=support[:-1] + [num_latents],
        weights=[inner_unroll_length + 1] + support,
        support_dropout=[inner_unroll_length + finetuning_unroll_length] + support,
        query_dropout=query,
    )


def _u64(value):
    return tf.constant(value, tf.uint64)


def mix64(z):
    """SplitMix64's output function on a uint64 tensor (a bijection of 2^64)."""
    for shift, multiplier in zip(MIX_SHIFTS[:2], MIX_MULTIPLIERS):
        z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, _u64(shift)))
        z = z * _u64(multiplier)
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, _u64(MIX_SHIFTS[2])))


def stream_key(seed):
    """The key of a stateless seed, int [2] (e.g. (run seed, step)): uint64 [].

    mix64(mix64(seed[0]) xor seed[1]), the seed's int64s read as uint64.
    """
    seed = tf.bitcast(tf.convert_to_tensor(seed, tf.int64), tf.uint64)
    return mix64(tf.bitwise.bitwise_xor(mix64(seed[0]), seed[1]))


def random_words(key, first, count):
    """Words first .. first + count - 1 of the stream `key`: uint64 [count].

    Word i is mix64(key + (i + 1) * GAMMA), all arithmetic modulo 2^64: the
    (i + 1)-th output of SplitMix64 seeded with key.
    """
    counters = tf.cast(
        tf.range(first + 1, first + count + 1, dtype=tf.int64), tf.uint64
    )
    return mix64(key + counters * _u64(GAMMA))


def mask_words(size):
    """How many random words a keep mask of `size` elements takes."""
    return -(-size // DECISIONS_PER_WORD)


def normal_words(size):
    """How many random words `size` standard normals take."""
    return -(-size // NORMALS_PER_WORD)


def keep_mask(shape, words, rate, dtype=tf.float32):
    """A scaled dropout keep mask: 0 with probability ~rate, else 1 / (1 - rate).

    Element 4 i + j of the (flattened) mask is decided by bits 16 j .. 16 j +
    15 of word i, a uniform integer in [0, 2^16), kept if at least the
    threshold round(rate * 2^16): the drop probability is rate rounded to a
    multiple of 2^-16 (0.3 -> 0.300003; the float32 uniforms of
    tf.nn.dropout round it to 2^-23). The scale 1 / (1 - rate) is that of
    tf.nn.dropout.

    Args:
      shape: the mask's shape, Python ints.
      words: uint64 [mask_words(prod(shape))] random words.
      rate: Python float, the probability of dropping a unit: 0, or in
        [MIN_DROPOUT_RATE, 1).
      dtype: float dtype of the mask.

    Returns:
      A tensor of `shape`.
    """
    size = math.prod(shape)
    shifts = _u64([16 * j for j in range(DECISIONS_PER_WORD)])
    quarters = tf.bitwise.right_shift(words[:, tf.newaxis], shifts)
    draws = tf.bitwise.bitwise_and(quarters, _u64(DROPOUT_LEVELS - 1))
    threshold = min(round(rate * DROPOUT_LEVELS), DROPOUT_LEVELS - 1)
    # One select instead of cast-to-float then scale: the same values
    # (1.0 * scale == scale), and no bool-to-float cast.
    keep = tf.where(
        draws >= _u64(threshold),
        tf.constant(1.0 / (1.0 - rate), dtype),
        tf.constant(0.0, dtype),
    )
    return tf.reshape(tf.reshape(keep, [-1])[:size], shape)


def centred_uniform(halves, dtype):
    """Uniforms in (0, 1) from uint64s holding 32 bits: (m + 1/2) 2^-b.

    m is the top b bits of each, b = 24 for float32 (its precision: every
    value exact) and 32 for float64.
    """
    bits = 24 if tf.as_dtype(dtype) == tf.float32 else 32
    top = tf.cast(tf.bitwise.right_shift(halves, _u64(32 - bits)), dtype)
    return (top + tf.constant(0.5, dtype)) * tf.constant(2.0**-bits, dtype)


def pair_uniforms(words, dtype):
    """(u1, u2): `centred_uniform`s of the words' low and high 32 bits, each [n]."""
    low = tf.bitwise.bitwise_and(words, _u64(2**32 - 1))
    high = tf.bitwise.right_shift(words, _u64(32))
    return centred_uniform(low, dtype), centred_uniform(high, dtype)


def box_muller(shape, u1, u2):
    """Standard normals of `shape` from uniforms u1, u2 `[n]`, 2 n >= its size.

    For independent u1 in (0, 1] and u2 in [0, 1), r = sqrt(-2 ln u1) and
    t = 2 pi u2, the pair (r cos t, r sin t) is two independent N(0, 1)
    samples: element i of the (flattened) output is r_i cos t_i, element
    n + i is r_i sin t_i. With float32's 24-bit uniforms, |r| < 5.9.
    """
    radius = tf.sqrt(-2.0 * tf.math.log(u1))
    angle = (2.0 * math.pi) * u2
    pairs = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)
    return tf.reshape(pairs[: math.prod(shape)], shape)


def standard_normal(shape, words, dtype=tf.float32):
    """Standard normals of `shape` from uint64 [normal_words(size)] random words.

    `box_muller` of the words' `pair_uniforms`.
    """
    return box_muller(shape, *pair_uniforms(words, dtype))


def word_ranges(shapes):
    """(first word, word count) of each EpisodeNoise field, consecutive."""
    first, ranges = 0, []
    for field, shape in zip(EpisodeNoise._fields, shapes):
        size = math.prod(shape)
        count = mask_words(size) if field in _MASK_FIELDS else normal_words(size)
        ranges.append((first, count))
        first += count
    return EpisodeNoise(*ranges)


def draw_noise(
    seed,
    support_shape,
    query_shape,
    *,
    num_latents,
    inner_unroll_length,
    finetuning_unroll_length,
    dropout_rate,
    dtype=tf.float32
):
    """Draws the noise of one meta-training step.

    Args:
      seed: int [2], a stateless seed; equal seeds give equal noise.
      support_shape: [B, N, K, D], Python ints.
      query_shape: [B, N, V, D].
      num_latents: L.
      inner_unroll_length: S, latent-space adaptation steps.
      finetuning_unroll_length: F, weight-space adaptation steps.
      dropout_rate: probability of dropping a unit; 0 gives all-ones masks.
      dtype: float dtype of the noise.

    Returns:
      EpisodeNoise of tensors with the shapes of `noise_shapes`: each field
      from its range of `word_ranges` of the stream `stream_key(seed)`.
    """
    shapes = noise_shapes(
        support_shape,
        query_shape,
        num_latents=num_latents,
        inner_unroll_length=inner_unroll_length,
        finetuning_unroll_length=finetuning_unroll_length,
    )
    bits = _compiled_bits(
        tuple(tuple(shape) for shape in shapes),
        float(dropout_rate),
        tf.as_dtype(dtype).name,
    )
    fields = bits(tf.convert_to_tensor(seed, tf.int64))
    normals = {
        field: box_muller(getattr(shapes, field), *getattr(fields, field))
        for field in EpisodeNoise._fields
        if field not in _MASK_FIELDS
    }
    return fields._replace(**normals)


@functools.lru_cache(maxsize=None)
def _compiled_bits(shapes, dropout_rate, dtype):
    """The XLA-compiled part of `draw_noise` for these static arguments.

    seed -> EpisodeNoise of the keep masks and, in place of the normals,
    their `pair_uniforms`. The Box-Muller transform stays out of XLA: its
    CPU sine and cosine are elementwise calls, ~4x slower than TensorFlow's
    vectorised kernels (BUILD.md, Performance).
    """
    ranges = word_ranges(shapes)

    def draw(seed):
        key = stream_key(seed)
        fields = {}
        for field, shape, (first, count) in zip(EpisodeNoise._fields, shapes, ranges):
            words = random_words(key, first, count)
            if field in _MASK_FIELDS:
                fields[field] = keep_mask(shape, words, dropout_rate, dtype)
            else:
                fields[field] = pair_uniforms(words, dtype)
        return EpisodeNoise(**fields)

    return tf.function(
        draw, input_signature=[tf.TensorSpec([2], tf.int64)], jit_compile=True
    )


def noise_dataset(
    seed, first_step, num_steps, support_shape, query_shape, model_config, prefetch=2
):
    """The noise of steps first_step .. first_step + num_steps - 1, as tf.data.

    Step s's noise is drawn from the stateless seed (seed, s), so it does not
    depend on where a run was resumed. Pure TensorFlow, drawn ahead of the
    training step by tf.data's background threads.

    Args:
      seed: the run's integer seed.
      first_step: the first step's number.
      num_steps: how many steps.
      support_shape: [B, N, K, D].
      query_shape: [B, N, V, D].
      model_config: ModelConfig (latent width, unroll lengths, dropout rate).
      prefetch: steps drawn ahead.

    Returns:
      tf.data.Dataset of EpisodeNoise.
    """

    def draw(step):
        return draw_noise(
            tf.stack([tf.constant(seed, tf.int64), step]),
            support_shape,
            query_shape,
            num_latents=model_config.num_latents,
            inner_unroll_length=model_config.inner_unroll_length,
            finetuning_unroll_length=model_config.finetuning_unroll_length,
            dropout_rate=model_config.dropout_rate,
        )

    steps = tf.data.Dataset.range(first_step, first_step + num_steps)
    return steps.map(draw).prefetch(prefetch)
