"""The generated regressor, LEO's regression adaptation and the MAML baseline."""

import numpy as np
import pytest
import tensorflow as tf

from leo_tf.regression import mlp
from leo_tf.regression import tasks as tasks_lib
from leo_tf.regression.config import RegressionConfig
from leo_tf.regression.maml import MAMLRegressor
from leo_tf.regression.model import LEORegressor, Noise, clip_per_task, draw_noise


def _config(**overrides):
    """A tiny float64-friendly configuration with every loss term switched on."""
    values = dict(
        hidden_units=3,
        num_latents=2,
        inner_unroll_length=2,
        finetuning_unroll_length=2,
        inner_lr_init=0.3,
        finetuning_lr_init=0.05,
        inner_gradient_norm_threshold=0.0,
        kl_weight=0.1,
        encoder_penalty_weight=0.1,
        l2_penalty_weight=0.01,
        orthogonality_penalty_weight=0.1,
        maml_inner_lr=0.1,
        maml_inner_steps=2,
    )
    values.update(overrides)
    return RegressionConfig(**values)


def _batch(num_tasks=2, num_shots=3, num_queries=4, dtype=np.float64):
    _, batch = tasks_lib.sample_batch(
        np.random.default_rng(7), num_tasks, num_shots, num_queries, 0.3
    )
    return tasks_lib.Batch(*(tf.constant(a.astype(dtype)) for a in batch))


def _numpy_forward(parameters, inputs, hidden_units):
    """The 1-H-H-1 ReLU MLP, unpacking the flat layout independently."""
    outputs = []
    for theta, x in zip(parameters, inputs):
        offset, hidden = 0, x
        sizes = [(1, hidden_units), (hidden_units, hidden_units), (hidden_units, 1)]
        for index, (fan_in, fan_out) in enumerate(sizes):
            kernel = theta[offset : offset + fan_in * fan_out].reshape(fan_in, fan_out)
            offset += fan_in * fan_out
            bias = theta[offset : offset + fan_out]
            offset += fan_out
            hidden = hidden @ kernel + bias
            if index < 2:
                hidden = np.maximum(hidden, 0.0)
        assert offset == theta.size
        outputs.append(hidden)
    return np.stack(outputs)


def test_generated_regressor_forward_matches_numpy():
    rng = np.random.default_rng(0)
    assert mlp.num_parameters(40) == 40 + 40 + 40 * 40 + 40 + 40 + 1
    parameters = rng.normal(size=(3, mlp.num_parameters(5)))
    inputs = rng.uniform(-5, 5, size=(3, 7, 1))

    outputs = mlp.forward(tf.constant(parameters), tf.constant(inputs), 5).numpy()

    np.testing.assert_allclose(
        outputs, _numpy_forward(parameters, inputs, 5), rtol=1e-12, atol=1e-12
    )


def _directional_derivatives(objective, variables, epsilon=1e-6):
    """(analytic, central-difference) derivatives along a random direction
    per variable."""
    with tf.GradientTape() as tape:
        value = objective()
    gradients = tape.gradient(value, variables)
    rng = np.random.default_rng(1)
    results = []
    for variable, gradient in zip(variables, gradients):
        direction = rng.normal(size=variable.shape)
        original = variable.numpy()
        variable.assign(original + epsilon * direction)
        plus = objective().numpy()
        variable.assign(original - epsilon * direction)
        minus = objective().numpy()
        variable.assign(original)
        analytic = float(np.sum(gradient.numpy() * direction))
        results.append((variable.path, analytic, (plus - minus) / (2 * epsilon)))
    return results


def test_leo_gradients_through_both_inner_loops_match_finite_differences():
    # Without the encoder penalty, whose target z' is held constant by design.
    config = _config(encoder_penalty_weight=0.0)
    model = LEORegressor(config, seed=3, dtype="float64")
    batch = _batch()
    noise = draw_noise(config, 2, tf.constant([5, 6], tf.int64), dtype=tf.float64)

    def objective():
        return model.meta_loss(batch, noise)[0]

    derivatives = _directional_derivatives(objective, model.trainable_variables)
    assert len(derivatives) == 8  # 5 kernels, 2 learning rates, the noise scale
    for name, analytic, numeric in derivatives:
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9), name


def test_maml_second_order_gradient_matches_finite_differences():
    config = _config()
    model = MAMLRegressor(config, seed=3, dtype="float64")
    batch = _batch()

    def objective():
        return tf.reduce_mean(model.query_mse(batch))

    [(name, analytic, numeric)] = _directional_derivatives(
        objective, model.trainable_variables
    )
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9), name


def test_maml_adaptation_is_plain_gradient_steps_on_the_support_mse():
    config = _config(maml_inner_steps=1, maml_inner_lr=0.1)
    model = MAMLRegressor(config, dtype="float64")
    batch = _batch()
    # Non-zero biases: no ReLU input sits exactly at its kink.
    theta = np.random.default_rng(4).normal(size=mlp.num_parameters(3))
    model.initial_parameters.assign(theta)
    # One step: theta - lr * d/dtheta mean_k (f(x_k) - y_k)^2, by central
    # differences in each coordinate (P = 25 for H = 3).
    expected = []
    for x, y in zip(batch.support_x.numpy(), batch.support_y.numpy()):
        gradient = np.zeros_like(theta)
        for i in range(theta.size):
            step = np.zeros_like(theta)
            step[i] = 1e-6
            plus, minus = (
                np.mean((_numpy_forward((theta + s)[None], x[None], 3)[0] - y) ** 2)
                for s in (step, -step)
            )
            gradient[i] = (plus - minus) / 2e-6
        expected.append(theta - 0.1 * gradient)

    adapted = model.adapt(batch.support_x, batch.support_y).numpy()

    np.testing.assert_allclose(adapted, np.stack(expected), rtol=1e-6, atol=1e-8)


def test_inner_loop_gradients_are_clipped_per_task():
    gradient = tf.constant([[3.0, 4.0], [0.6, 0.8]], tf.float64)  # norms 5 and 1

    np.testing.assert_allclose(
        clip_per_task(gradient, 2.0), [[1.2, 1.6], [0.6, 0.8]], rtol=1e-12
    )
    np.testing.assert_array_equal(clip_per_task(gradient, 0.0), gradient)


def test_maml_steps_are_clipped_like_leos():
    config = _config(maml_inner_steps=1, inner_gradient_norm_threshold=1e-3)
    model = MAMLRegressor(config, seed=2, dtype="float64")
    batch = _batch()

    adapted = model.adapt(batch.support_x, batch.support_y).numpy()

    moved = np.linalg.norm(adapted - model.initial_parameters.numpy(), axis=1)
    np.testing.assert_allclose(moved, config.maml_inner_lr * 1e-3, rtol=1e-9)


def test_evaluation_takes_the_means_of_both_gaussians():
    config = _config()
    model = LEORegressor(config, seed=5, dtype="float64")
    batch = _batch()
    shapes = draw_noise(config, 2, tf.constant([0, 0], tf.int64), dtype=tf.float64)
    zero_noise = Noise(*(tf.zeros_like(n) for n in shapes))

    means = model.adapt(batch.support_x, batch.support_y)
    zero = model.adapt(batch.support_x, batch.support_y, zero_noise)
    sampled = model.adapt(batch.support_x, batch.support_y, shapes)
    losses = model.task_losses(batch)

    np.testing.assert_allclose(means.parameters, zero.parameters, rtol=1e-12)
    assert not np.allclose(means.parameters, sampled.parameters)
    np.testing.assert_array_equal(losses.kl, 0.0)
    np.testing.assert_array_equal(losses.encoder_penalty, 0.0)


def test_predictive_nll_is_that_of_the_equal_mixture_of_samples():
    model = LEORegressor(_config(), dtype="float64")
    model.log_noise_stddev.assign(np.log(0.5))
    rng = np.random.default_rng(6)
    samples = rng.normal(size=(4, 2, 3, 1))  # S=4 samples, B=2 tasks, M=3 points
    targets = rng.normal(size=(2, 3, 1))
    density = np.exp(-((targets[None] - samples) ** 2) / (2 * 0.25)) / np.sqrt(
        2 * np.pi * 0.25
    )
    expected = -np.log(density.mean(axis=0))[..., 0].mean(axis=1)

    nll = model.predictive_nll(tf.constant(samples), tf.constant(targets)).numpy()

    np.testing.assert_allclose(nll, expected, rtol=1e-10)
