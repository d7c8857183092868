"""The random numbers of a meta-training step, drawn ahead of the step.

LEO's meta-training step is stochastic in five places:
the encoder's input dropout, the latent sample, the classifier-weight sample
after every decode, the classifier's input dropout on every support-loss
evaluation, and the classifier's input dropout on the query set. Drawing all
of them up front, from one stateless seed with the fast Philox generator,
keeps random-number generation out of the compiled step (it can run in the
input pipeline), makes every step a pure function of (weights, data, seed),
and lets tests hold the noise fixed.

Support-loss evaluations: the latent loop evaluates the support loss once per
latent step (S of them, before each update), and the finetuning loop once per
finetuning step (F of them, the first on the weights decoded from the final
latents), so S + F dropout masks; the weights are sampled S + 1 times.
"""

import math
from typing import NamedTuple

import tensorflow as tf

# The resolution of a dropout decision and the smallest non-zero rate it
# resolves are defined with the flags, which are checked before TensorFlow loads.
from leo_tf.config import DROPOUT_LEVELS

_ALGORITHM = "philox"


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
    support, query = list(support_shape), list(query_shape)
    return EpisodeNoise(
        encoder_dropout=support,
        latent=support[:-1] + [num_latents],
        weights=[inner_unroll_length + 1] + support,
        support_dropout=[inner_unroll_length + finetuning_unroll_length] + support,
        query_dropout=query,
    )


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
      EpisodeNoise of tensors with the shapes of `noise_shapes`.
    """
    shapes = noise_shapes(
        support_shape,
        query_shape,
        num_latents=num_latents,
        inner_unroll_length=inner_unroll_length,
        finetuning_unroll_length=finetuning_unroll_length,
    )
    seeds = tf.random.experimental.stateless_split(
        tf.convert_to_tensor(seed, tf.int64), num=5, alg=_ALGORITHM
    )
    return EpisodeNoise(
        encoder_dropout=keep_mask(
            shapes.encoder_dropout, seeds[0], dropout_rate, dtype
        ),
        latent=standard_normal(shapes.latent, seeds[1], dtype),
        weights=standard_normal(shapes.weights, seeds[2], dtype),
        support_dropout=keep_mask(
            shapes.support_dropout, seeds[3], dropout_rate, dtype
        ),
        query_dropout=keep_mask(shapes.query_dropout, seeds[4], dropout_rate, dtype),
    )


def keep_mask(shape, seed, rate, dtype=tf.float32):
    """A scaled dropout keep mask: 0 with probability ~rate, else 1 / (1 - rate).

    Each decision compares a uniform 16-bit integer with the threshold
    round(rate * 2^16), two decisions per 32-bit word of the Philox generator,
    so the drop probability is rate rounded to a multiple of 2^-16 (0.3 ->
    0.300003; the float32 uniforms of tf.nn.dropout round it to a multiple of
    2^-23). Half the random words make the masks of a 5-shot step 1.8x faster
    to draw on CPU (BUILD.md, Performance): generating the words is most of
    their cost. The scale 1 / (1 - rate) is that of tf.nn.dropout. On a
    big-endian machine the two halves of a word swap roles (other draws, the
    same distribution).

    Args:
      shape: the mask's shape (a list or a 1-D int tensor).
      seed: int [2], a stateless seed.
      rate: Python float, the probability of dropping a unit: 0, or in
        [MIN_DROPOUT_RATE, 1).
      dtype: float dtype of the mask.

    Returns:
      A tensor of `shape`.
    """
    shape = tf.convert_to_tensor(shape, tf.int32)
    size = tf.reduce_prod(shape)
    words = tf.random.stateless_uniform(
        [(size + 1) // 2],
        seed,
        dtype=tf.uint32,
        minval=None,
        maxval=None,
        alg=_ALGORITHM,
    )
    draws = tf.reshape(tf.bitcast(words, tf.uint16), [-1])[:size]  # 0 .. 2^16 - 1
    threshold = min(round(rate * DROPOUT_LEVELS), DROPOUT_LEVELS - 1)
    # One select instead of cast-to-float then scale: the same values
    # (1.0 * scale == scale), one pass less over the mask, and no bool-to-float
    # cast, which is slow on CPU.
    keep = tf.where(
        draws >= tf.constant(threshold, tf.uint16),
        tf.constant(1.0 / (1.0 - rate), dtype),
        tf.constant(0.0, dtype),
    )
    return tf.reshape(keep, shape)


def standard_normal(shape, seed, dtype=tf.float32):
    """Standard normal samples of `shape`, by the Box-Muller transform.

    For independent u1 in (0, 1] and u2 in [0, 1), r = sqrt(-2 ln u1) and
    t = 2 pi u2, the pair (r cos t, r sin t) is two independent N(0, 1)
    samples. `tf.random.stateless_normal` applies this same transform one pair
    at a time with scalar calls; written as whole-tensor ops, it draws the
    normals of a 5-shot step twice as fast on CPU (BUILD.md, Performance).

    Args:
      shape: the output shape (a list or a 1-D int tensor).
      seed: int [2], a stateless seed.
      dtype: float dtype.

    Returns:
      A tensor of `shape`; the first half of its flattened elements are the
      r cos t of the pairs, the second half their r sin t.
    """
    shape = tf.convert_to_tensor(shape, tf.int32)
    size = tf.reduce_prod(shape)
    uniform = _stateless_unit_uniform(tf.stack([2, (size + 1) // 2]), seed, dtype)
    radius = tf.sqrt(-2.0 * tf.math.log(1.0 - uniform[0]))
    angle = (2.0 * math.pi) * uniform[1]
    pairs = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)
    return tf.reshape(pairs[:size], shape)


def _stateless_unit_uniform(shape, seed, dtype):
    """tf.random.stateless_uniform(shape, seed, dtype, alg="philox"), in [0, 1).

    The same values without the public function's `* (maxval - minval) +
    minval`, which for [0, 1) multiplies by 1 and adds 0: two passes over the
    draws that change nothing. The key and counter come from the op that
    scrambles a seed for the device's default algorithm, Philox on CPUs and
    GPUs, the same scrambling as the public function's for "philox" (tests
    check the values bit for bit).
    """
    key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=seed)
    return tf.raw_ops.StatelessRandomUniformV2(
        shape=shape,
        key=key,
        counter=counter,
        alg=tf.random.Algorithm.PHILOX.value,
        dtype=dtype,
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
