"""The outer-loop step: NaN guard, clipping, Adam, determinism, tracing."""

import json

import numpy as np
import pytest
import tensorflow as tf

from leo_tf import ops, runtime, steps
from leo_tf.config import OptimizerConfig
from tests import model_fixtures as fx
from tests import run_fixtures


def _adam_first_update(gradient, lr, epsilon=1e-8, beta1=0.9, beta2=0.999):
    """The change of a variable by one Adam step from zero moments, in NumPy."""
    m = (1 - beta1) * gradient
    v = (1 - beta2) * gradient**2
    alpha = lr * np.sqrt(1 - beta2) / (1 - beta1)
    return -alpha * m / (np.sqrt(v) + epsilon)


def _assert_update(new, old, expected_update, name):
    # Keras keeps Adam's beta constants in float32 (1 - 0.999 is off by 1e-5
    # relative there), so updates agree to ~1e-5, not to float64 precision.
    np.testing.assert_allclose(
        new - old, expected_update, rtol=1e-4, atol=1e-12, err_msg=name
    )


def _clip_numpy(gradient, value, norm):
    gradient = np.clip(gradient, -value, value)
    length = np.linalg.norm(gradient)
    return gradient * norm / length if length > norm else gradient


def test_clipping_is_by_value_then_by_norm_per_tensor():
    large = np.array([0.3, -0.05, 0.02])
    small = np.array([0.01, 0.01])

    clipped = steps.clip_gradients([tf.constant(large), tf.constant(small)], 0.1, 0.1)

    # Value clip gives [0.1, -0.05, 0.02], norm 0.1136 > 0.1, so rescaled.
    np.testing.assert_allclose(
        clipped[0].numpy(), _clip_numpy(large, 0.1, 0.1), rtol=1e-12
    )
    assert np.linalg.norm(clipped[0].numpy()) == pytest.approx(0.1)
    # Per tensor, never global: the small tensor is untouched.
    np.testing.assert_array_equal(clipped[1].numpy(), small)


def test_clipping_thresholds_of_zero_disable_clipping():
    gradient = tf.constant([5.0, -7.0])
    np.testing.assert_array_equal(
        steps.clip_gradients([gradient], 0, 0)[0].numpy(), [5.0, -7.0]
    )


def test_nan_guard_substitutes_weight_decay_and_zeros():
    weights = tf.Variable([[1.0, -2.0]])
    rate = tf.Variable([0.5])
    gradients = [tf.constant([[np.nan, 1.0]]), tf.constant([3.0])]

    guarded, fired = steps.nan_guarded_gradients(
        tf.constant(1.0), gradients, [weights, rate], [weights]
    )

    assert bool(fired)
    np.testing.assert_allclose(guarded[0].numpy(), [[1e-4, -2e-4]])
    np.testing.assert_array_equal(guarded[1].numpy(), [0.0])


def test_nan_guard_passes_finite_gradients_through():
    weights = tf.Variable([[1.0, -2.0]])
    gradients = [tf.constant([[0.5, 1.0]])]
    guarded, fired = steps.nan_guarded_gradients(
        tf.constant(2.0), gradients, [weights], [weights]
    )
    assert not bool(fired)
    np.testing.assert_array_equal(guarded[0].numpy(), [[0.5, 1.0]])


def _train_setup(dtype="float64", seed=0):
    model = fx.small_model(dtype=dtype, seed=seed)
    config = OptimizerConfig(outer_lr=1e-3)
    optimizer = steps.make_optimizer(config)
    return model, optimizer, config


def test_nan_in_the_loss_yields_the_weight_decay_update_not_nan_weights():
    model, optimizer, config = _train_setup()
    episodes = fx.random_episodes(1)
    corrupted = episodes.tr_input.numpy()
    corrupted[0, 0, 0, 0] = np.nan
    episodes = episodes._replace(tr_input=tf.constant(corrupted))
    noise = fx.noise_for(episodes, model.config, dtype=tf.float64)
    before = [v.numpy() for v in model.trainable_variables]
    decayed = {v.path for v in model.weight_matrices}

    metrics = steps.train_step_fn(model, optimizer, config)(episodes, noise)

    assert bool(metrics.nan_guard)
    assert np.isnan(metrics.loss.numpy())
    for variable, old in zip(model.trainable_variables, before):
        new = variable.numpy()
        assert np.all(np.isfinite(new)), variable.path
        if variable.path in decayed:
            gradient = _clip_numpy(1e-4 * old, 0.1, 0.1)
            _assert_update(new, old, _adam_first_update(gradient, 1e-3), variable.path)
        else:  # the learning-rate vectors get zero gradients
            np.testing.assert_array_equal(new, old)


def test_train_step_applies_adam_to_clipped_second_order_gradients():
    model, optimizer, config = _train_setup()
    episodes = fx.random_episodes(2)
    noise = fx.noise_for(episodes, model.config, dtype=tf.float64)
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        objective = model.meta_batch_loss(episodes, noise)
    gradients = [g.numpy() for g in tape.gradient(objective.total, variables)]
    before = [v.numpy() for v in variables]

    metrics = steps.train_step_fn(model, optimizer, config)(episodes, noise)

    assert not bool(metrics.nan_guard)
    assert metrics.loss.numpy() == pytest.approx(objective.total.numpy())
    assert metrics.gradient_norm.numpy() == pytest.approx(
        np.sqrt(sum(np.sum(g**2) for g in gradients))
    )
    assert metrics.accuracy.numpy() == pytest.approx(
        np.mean(objective.episodes.accuracy.numpy())
    )
    assert metrics.kl.numpy() == pytest.approx(np.mean(objective.episodes.kl.numpy()))
    for variable, old, gradient in zip(variables, before, gradients):
        _assert_update(
            variable.numpy(),
            old,
            _adam_first_update(_clip_numpy(gradient, 0.1, 0.1), 1e-3),
            variable.path,
        )


def _run_steps(seed, noise_seed, num_steps=3):
    model, optimizer, config = _train_setup(dtype="float32", seed=seed)
    step = steps.train_step_fn(model, optimizer, config)
    history = []
    for index in range(num_steps):
        episodes = fx.random_episodes(100 + index)
        noise = fx.noise_for(episodes, model.config, seed=(noise_seed, index))
        metrics = step(episodes, noise)
        history.append(
            [
                metrics.loss.numpy(),
                metrics.accuracy.numpy(),
                metrics.gradient_norm.numpy(),
            ]
        )
    return np.array(history), [v.numpy() for v in model.trainable_variables]


def test_training_with_a_fixed_seed_is_reproducible():
    first, first_weights = _run_steps(seed=0, noise_seed=5)
    second, second_weights = _run_steps(seed=0, noise_seed=5)
    other, _ = _run_steps(seed=0, noise_seed=6)

    np.testing.assert_array_equal(first, second)
    for a, b in zip(first_weights, second_weights):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first, other)


def test_host_matmul_is_per_episode_on_cpus_and_batched_on_gpus(monkeypatch):
    monkeypatch.setattr(runtime, "_has_gpu", lambda: False)
    assert steps.host_matmul() is ops.per_episode_matmul
    monkeypatch.setattr(runtime, "_has_gpu", lambda: True)
    assert steps.host_matmul() is tf.matmul


@pytest.mark.parametrize("has_gpu", [False, True])
def test_host_products_set_the_hosts_matmul_only_within(monkeypatch, has_gpu):
    monkeypatch.setattr(runtime, "_has_gpu", lambda: has_gpu)
    model = fx.small_model()
    with steps.host_products(model):
        assert model.matmul is steps.host_matmul()
    assert model.matmul is ops.per_episode_matmul
    with pytest.raises(ValueError, match="inside"):
        with steps.host_products(model):
            raise ValueError("inside")
    assert model.matmul is ops.per_episode_matmul


@pytest.mark.parametrize("matmul", [ops.per_episode_matmul, tf.matmul])
def test_towers_give_the_same_results_as_one_batch(matmul):
    model = fx.small_model(dtype="float64")
    episodes = fx.random_episodes(12, batch=4)
    noise = fx.noise_for(episodes, model.config, dtype=tf.float64)
    one = model.run_episodes(episodes, noise)
    model.matmul = matmul
    two = steps.run_towers(model, episodes, noise, 2)
    for name in ("loss", "accuracy", "kl", "encoder_penalty", "logits"):
        np.testing.assert_allclose(
            np.concatenate([getattr(part, name).numpy() for part in two]),
            getattr(one, name).numpy(),
            rtol=1e-12,
            err_msg=name,
        )


@pytest.mark.parametrize("num_towers", [1, 3])
def test_tower_gradients_summed_equal_the_gradient_of_the_total(num_towers):
    model = fx.small_model(dtype="float64")
    episodes = fx.random_episodes(13, batch=6)
    noise = fx.noise_for(episodes, model.config, dtype=tf.float64)
    with tf.GradientTape() as tape:
        objective = model.meta_batch_loss(episodes, noise)
    expected = tape.gradient(objective.total, model.trainable_variables)

    gradients, scaled = steps._scaled_gradients(model, episodes, noise, 0.5, num_towers)

    assert scaled.total.numpy() == pytest.approx(objective.total.numpy(), rel=1e-14)
    np.testing.assert_allclose(
        scaled.episodes.logits.numpy(), objective.episodes.logits.numpy(), rtol=1e-12
    )
    for variable, a, b in zip(model.trainable_variables, expected, gradients):
        np.testing.assert_allclose(
            b.numpy(), 0.5 * a.numpy(), rtol=1e-12, atol=1e-15, err_msg=variable.path
        )


@pytest.mark.slow
def test_gradients_of_towers_side_by_side_are_bit_for_bit_reproducible():
    # Summed by the tape, the gradients of two towers running side by side
    # differed in their last bits between calls with equal inputs
    # (relation-network and encoder kernels, in a quarter to a half of the
    # calls on these shapes; README, Reproducibility). In a fresh process,
    # with leo_tf's thread settings.
    result = run_fixtures.run_module("tests.tower_gradient_repeats", 30, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    changed = json.loads(result.stdout.strip().splitlines()[-1])
    assert changed == {}, f"calls whose gradient changed, per variable: {changed}"


def test_compiled_train_step_traces_once_per_shape():
    model, optimizer, config = _train_setup(dtype="float32")
    spec = fx.episodes_spec(3, 3, 2, 4, 8)
    train_step = steps.compile_train_step(model, optimizer, config, spec)
    for index in range(12):
        episodes = fx.random_episodes(index)
        train_step(episodes, fx.noise_for(episodes, model.config, seed=(0, index)))
    assert train_step.experimental_get_tracing_count() == 1


def test_compiled_step_in_float32_agrees_with_float64():
    """The optimised, compiled step: float32 tracks float64 over 3 updates."""
    initial = [
        v.numpy() for v in fx.small_model(dtype="float32", seed=3).trainable_variables
    ]
    results = []
    for dtype in ("float32", "float64"):
        model, optimizer, config = _train_setup(dtype=dtype, seed=3)
        for variable, value in zip(model.trainable_variables, initial):
            variable.assign(value.astype(dtype))  # both start from equal weights
        step = steps.compile_train_step(
            model, optimizer, config, fx.episodes_spec(3, 3, 2, 4, 8)
        )
        losses = []
        for index in range(3):
            episodes = fx.random_episodes(20 + index)
            noise = fx.noise_for(episodes, model.config, seed=(9, index))
            noise = tf.nest.map_structure(lambda x: tf.cast(x, dtype), noise)
            losses.append(float(step(episodes, noise).loss))
        results.append((losses, [v.numpy() for v in model.trainable_variables]))
    (losses32, weights32), (losses64, weights64) = results
    np.testing.assert_allclose(losses32, losses64, rtol=1e-5)
    for w32, w64, w0 in zip(weights32, weights64, initial):
        # Adam's steps (~1e-3 each) agree to well under 1% of their size.
        np.testing.assert_allclose(w32 - w0, w64 - w0, rtol=0, atol=2e-5)
        assert np.abs(w64 - w0).max() > 1e-4


def test_training_without_finetuning_steps_leaves_its_rate_alone():
    config = fx.small_config(finetuning_unroll_length=0)
    model = fx.small_model(config, dtype="float64")
    optimizer = steps.make_optimizer(OptimizerConfig(outer_lr=1e-3))
    before = model.finetuning_lr.numpy()
    episodes = fx.random_episodes(4)
    noise = fx.noise_for(episodes, config, dtype=tf.float64)

    metrics = steps.train_step_fn(model, optimizer, OptimizerConfig())(episodes, noise)

    assert np.isfinite(metrics.loss.numpy()) and not bool(metrics.nan_guard)
    np.testing.assert_array_equal(model.finetuning_lr.numpy(), before)
    assert np.abs(model.inner_lr.numpy() - 1.0).max() > 0
