"""LEO's Gaussians and latent regularisers against NumPy densities."""

import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from leo_tf import gaussians

tfd = tfp.distributions


def test_latent_gaussian_stddev_transform_matches_numpy():
    params = np.array([[0.3, -1.2, 0.5, 1e-9, -3.0, 2.0]])
    # exp(u) - 1, taken exactly (expm1) near u = 0, floored at 1e-10.
    expected_scale = np.maximum(np.expm1(params[:, 3:]), 1e-10)

    distribution = gaussians.gaussian(tf.constant(params))

    np.testing.assert_allclose(distribution.loc.numpy(), params[:, :3])
    np.testing.assert_allclose(distribution.scale.numpy(), expected_scale, rtol=1e-9)
    assert distribution.scale.numpy()[0, 1] == 1e-10  # the floor applies
    # float32 keeps the digits of a tiny stddev near u = 0.
    tiny = gaussians.latent_stddev(tf.constant([1e-6], tf.float32)).numpy()
    np.testing.assert_allclose(tiny, np.expm1(1e-6), rtol=1e-6)


def test_weight_stddev_transform_matches_numpy():
    pre_stddev = np.array([0.3, -1.2, 1e-9, -0.05, 2.0])
    offset = np.sqrt(2.0 / (640 + 5))
    expected = np.maximum(np.exp(pre_stddev) - (1 - offset), 1e-10)
    actual = gaussians.weight_stddev(tf.constant(pre_stddev), offset).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-9)
    assert actual[1] == 1e-10 and actual[3] > 1e-3  # floored / offset applies


def test_kl_estimate_matches_numpy_log_densities():
    rng = np.random.default_rng(5)
    loc = rng.normal(size=(2, 3, 1, 4))
    scale = rng.uniform(0.2, 2.0, size=loc.shape)
    noise = rng.normal(size=loc.shape)
    samples = loc + scale * noise
    log_q = (
        -0.5 * ((samples - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)
    )
    log_p = -0.5 * samples**2 - 0.5 * np.log(2 * np.pi)
    expected = (log_q - log_p).reshape(2, -1).mean(axis=1)

    kl = gaussians.kl_estimate(
        tfd.Normal(tf.constant(loc), tf.constant(scale)),
        tf.constant(noise),
        tf.constant(samples),
    ).numpy()

    np.testing.assert_allclose(kl, expected, rtol=1e-12)


def test_kl_estimate_is_stable_in_float32_at_the_stddev_floor():
    rng = np.random.default_rng(6)
    loc = rng.normal(size=(1, 64)).astype(np.float32)
    scale = np.full_like(loc, 1e-10)
    noise = rng.normal(size=loc.shape).astype(np.float32)
    # Exact value in float64: log q = log N(e) - log(scale).
    exact = np.mean(
        -0.5 * noise.astype(np.float64) ** 2
        - np.log(1e-10)
        + 0.5 * loc.astype(np.float64) ** 2
    )
    distribution = tfd.Normal(tf.constant(loc), tf.constant(scale))
    samples = distribution.loc + distribution.scale * noise

    stable = gaussians.kl_estimate(distribution, tf.constant(noise), samples).numpy()[0]
    naive = np.mean(
        (
            distribution.log_prob(samples) - tfd.Normal(0.0, 1.0).log_prob(samples)
        ).numpy()
    )

    assert stable == pytest.approx(exact, rel=1e-5)
    assert abs(naive - exact) > 0.1  # what the authors' form loses in float32


def test_latent_regularisers_are_the_kl_and_the_mean_squared_code_change():
    rng = np.random.default_rng(7)
    loc = rng.normal(size=(2, 3, 1, 4))
    scale = rng.uniform(0.2, 2.0, size=loc.shape)
    noise = rng.normal(size=loc.shape)
    latents = tf.constant(loc + scale * noise)
    adapted = tf.constant(rng.normal(size=loc.shape))
    adaptation = types.SimpleNamespace(
        latent_distribution=tfd.Normal(tf.constant(loc), tf.constant(scale)),
        latents=latents,
        adapted_latents=adapted,
    )
    with tf.GradientTape() as tape:
        tape.watch(adapted)
        kl, penalty = gaussians.latent_regularisers(adaptation, tf.constant(noise))
    expected_kl = gaussians.kl_estimate(
        adaptation.latent_distribution, tf.constant(noise), latents
    )
    change = (latents.numpy() - adapted.numpy()).reshape(2, -1)

    np.testing.assert_array_equal(kl.numpy(), expected_kl.numpy())
    np.testing.assert_allclose(penalty.numpy(), (change**2).mean(axis=1), rtol=1e-12)
    assert tape.gradient(penalty, adapted) is None  # z' is held constant
    # Without noise (evaluation) both are zero, one per episode.
    kl, penalty = gaussians.latent_regularisers(adaptation, None)
    np.testing.assert_array_equal(kl.numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(penalty.numpy(), [0.0, 0.0])
