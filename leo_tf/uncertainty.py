"""Predictive uncertainty of LEO from several stochastic adaptations.

LEO's latent codes and classifier weights are samples of data-dependent
Gaussians. The deterministic answer (the exported `serving_default`) adapts
once with their means; here a few-shot task is instead adapted S times, each
time with the latent codes and every decode's weights sampled as in
meta-training (no dropout), and the S query predictions are summarised:

    mean probabilities       p(y | x) = mean_s softmax(logits_s)     [M, N]
    probability spread       std_s softmax(logits_s)                 [M, N]
    predictive entropy       -sum_n p_n log p_n                       [M]

With all sampled noise zero, every sample is the deterministic adaptation.
`expected_calibration_error` scores how well the probabilities' confidence
matches accuracy.
"""

import numpy as np
import tensorflow as tf

from leo_tf.noise import EpisodeNoise


def adaptation_noise_shapes(model, support_shape, num_samples):
    """Shapes of the standard normals of S adaptations of one task.

    Args:
      model: LEO.
      support_shape: [N, K, D] (ints or a 1-D int tensor).
      num_samples: S (int or int scalar tensor).

    Returns:
      (latent shape [S, N, K, L], weight shape [I + 1, S, N, K, D]) as int32
      tensors, I the latent inner-loop steps: the weights are sampled after
      each of the I + 1 decodes.
    """
    support_shape = tf.cast(support_shape, tf.int32)
    samples = tf.reshape(tf.cast(num_samples, tf.int32), [1])
    latent = tf.concat([samples, support_shape[:2], [model.config.num_latents]], 0)
    weights = tf.concat(
        [[model.config.inner_unroll_length + 1], samples, support_shape], 0
    )
    return latent, weights


def draw_adaptation_noise(model, support_shape, num_samples, seed):
    """Standard normals for S adaptations, a pure function of `seed`.

    Args:
      model: LEO.
      support_shape: [N, K, D].
      num_samples: S.
      seed: int64 scalar.

    Returns:
      (latent noise [S, N, K, L], weight noise [I + 1, S, N, K, D]).
    """
    latent_shape, weight_shape = adaptation_noise_shapes(
        model, support_shape, num_samples
    )
    seed = tf.cast(seed, tf.int64)
    latent = tf.random.stateless_normal(
        latent_shape, tf.stack([seed, 0]), dtype=model.compute_dtype
    )
    weights = tf.random.stateless_normal(
        weight_shape, tf.stack([seed, 1]), dtype=model.compute_dtype
    )
    return latent, weights


def sampled_probabilities(model, support, query, latent_noise, weight_noise):
    """Query probabilities of S stochastic adaptations to one task.

    Args:
      model: LEO.
      support: [N, K, D] normalised support examples, class n in row n.
      query: [M, D] normalised queries.
      latent_noise: [S, N, K, L] standard normals of the latent samples.
      weight_noise: [I + 1, S, N, K, D] standard normals of the weight samples.

    Returns:
      [S, M, N] softmax probabilities, one row block per adaptation.
    """
    num_samples = tf.shape(latent_noise)[0]
    shape = tf.shape(support)
    labels = tf.broadcast_to(
        tf.range(shape[0])[None, :, None, None],
        tf.stack([num_samples, shape[0], shape[1], 1]),
    )
    supports = tf.broadcast_to(
        support[None], tf.concat([[num_samples], tf.shape(support)], 0)
    )
    noise = EpisodeNoise(
        encoder_dropout=None,
        latent=latent_noise,
        weights=weight_noise,
        support_dropout=None,
        query_dropout=None,
    )
    class_weights = model.adapt(supports, labels, noise).class_weights  # [S, N, D]
    queries = tf.broadcast_to(
        query[None, None], tf.concat([[num_samples, 1], tf.shape(query)], 0)
    )
    logits = model.predict(queries, class_weights)[:, 0]  # [S, M, N]
    return tf.nn.softmax(logits)


def summarise(probabilities):
    """Mean, spread and entropy of sampled probabilities [S, M, N].

    Returns:
      dict of mean_probabilities [M, N], probability_stddev [M, N] (the
      population standard deviation over the S samples) and
      predictive_entropy [M] (nats, of the mean probabilities).
    """
    mean = tf.reduce_mean(probabilities, axis=0)
    stddev = tf.math.reduce_std(probabilities, axis=0)
    entropy = -tf.reduce_sum(tf.math.multiply_no_nan(tf.math.log(mean), mean), axis=-1)
    return {
        "mean_probabilities": mean,
        "probability_stddev": stddev,
        "predictive_entropy": entropy,
    }


def expected_calibration_error(probabilities, labels, num_bins=15):
    """Expected calibration error of top-class confidences, in [0, 1].

    The queries are grouped by their confidence max_n p_n into num_bins equal
    bins of [0, 1] (a confidence on a bin edge goes to the upper bin, 1.0 to
    the last); ECE = sum over bins of |accuracy - mean confidence| weighted by
    the bin's share of the queries.

    Args:
      probabilities: [Q, N] predicted probabilities.
      labels: [Q] int true classes.
      num_bins: number of bins.

    Returns:
      float.
    """
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels)
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == labels
    bins = np.minimum((confidence * num_bins).astype(np.int64), num_bins - 1)
    error = 0.0
    for index in np.unique(bins):
        members = bins == index
        error += abs(correct[members].mean() - confidence[members].mean()) * (
            members.mean()
        )
    return float(error)
