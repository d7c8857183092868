"""LEO's Gaussians: parameterisation, reparameterised samples, single-sample KL.

The encoder and the decoder output a Gaussian's parameters, mean then
stddev pre-activation u; codes and weights are its reparameterised samples
in meta-training and its mean in evaluation, where the latent regularisers
(the KL term and the encoder penalty) are zero. B episodes (or tasks) lead
every shape.
"""

import tensorflow as tf
import tensorflow_probability as tfp

from leo_tf import ops

tfd = tfp.distributions


def gaussian(parameters):
    """Normal over `[..., M]` of `parameters: [..., 2M]`: mean, then u (stddev)."""
    loc, pre_stddev = tf.split(parameters, 2, axis=-1)
    return tfd.Normal(loc=loc, scale=latent_stddev(pre_stddev))


def latent_stddev(pre_stddev):
    """max(exp(u) - 1, 1e-10), with exp(u) - 1 as expm1(u), exact near u = 0."""
    return ops.floored(tf.math.expm1(pre_stddev))


def weight_stddev(pre_stddev, stddev_offset):
    """max(exp(u) - (1 - stddev_offset), 1e-10), elementwise, as the authors."""
    return ops.floored(tf.exp(pre_stddev) - (1.0 - stddev_offset))


def sample(distribution, standard_noise):
    """Reparameterised sample loc + scale * noise; the mean when noise is None."""
    if standard_noise is None:
        return distribution.mean()
    return distribution.loc + distribution.scale * standard_noise


def kl_estimate(distribution, standard_noise, samples):
    """Single-sample KL(q || N(0, I)) `[B]`: mean of log q(z) - log N(z; 0, 1).

    distribution, standard_noise e, samples z = loc + scale * e: `[B, ...]`.
    log q(z) = log N(e; 0, 1) - log(scale), which `distribution.log_prob(z)`
    loses in float32 where scale is at its 1e-10 floor (z rounds to loc).
    """
    standard = tfd.Normal(
        loc=tf.zeros([], samples.dtype), scale=tf.ones([], samples.dtype)
    )
    log_q = standard.log_prob(standard_noise) - tf.math.log(distribution.scale)
    log_prior = standard.log_prob(samples)
    return ops.mean_per_episode(log_q - log_prior)


def latent_regularisers(adaptation, latent_noise):
    """(KL estimate, encoder penalty), each `[B]`; zeros without noise (evaluation).

    adaptation: its latent_distribution, latents z (sampled with latent_noise)
    and adapted_latents z', each over `[B, ...]`.
    """
    latents = adaptation.latents
    if latent_noise is None:
        zeros = tf.zeros(tf.shape(latents)[:1], latents.dtype)
        return zeros, zeros
    kl = kl_estimate(adaptation.latent_distribution, latent_noise, latents)
    return kl, encoder_penalty(latents, adaptation.adapted_latents)


def encoder_penalty(latents, adapted_latents):
    """mean (z - stop_gradient(z'))^2 `[B]` of codes before and after adapting."""
    return ops.mean_per_episode(tf.square(latents - tf.stop_gradient(adapted_latents)))
