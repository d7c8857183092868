"""LEO's equations, inner loops and gradients against independent maths."""

from typing import NamedTuple

import numpy as np
import pytest
import tensorflow as tf

from leo_tf import model as model_lib
from leo_tf import reference as reference_leo
from leo_tf import runtime, steps
from tests import model_fixtures as fx


def _softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------- equations
def test_decode_is_class_mean_of_per_shot_samples_with_glorot_stddev_offset():
    rng = np.random.default_rng(0)
    model = fx.small_model(dim=8, dtype="float64")
    latents = rng.normal(size=(2, 3, 2, 4))
    noise = rng.normal(size=(2, 3, 2, 8))
    params = latents @ model.decoder.kernel.numpy()  # every shot decoded
    offset = np.sqrt(2.0 / (8 + 3))  # D = 8, N = 3
    scale = np.maximum(np.exp(params[..., 8:]) - (1 - offset), 1e-10)
    assert np.median(scale) > 0.1  # mostly above the floor: the offset matters
    samples = params[..., :8] + scale * noise  # w[n, k], [2, 3, 2, 8]

    sampled = model.decode(tf.constant(latents), tf.constant(noise))
    mean = model.decode(tf.constant(latents))

    np.testing.assert_allclose(sampled.numpy(), samples.mean(axis=2), rtol=1e-9)
    np.testing.assert_allclose(mean.numpy(), params[..., :8].mean(axis=2), rtol=1e-9)


def test_decode_without_noise_does_not_use_the_stddev_half():
    model = fx.small_model(dim=8, dtype="float64")
    latents = np.random.default_rng(0).normal(size=(2, 3, 2, 4))
    kernel = model.decoder.kernel.numpy()
    expected = (latents @ kernel[:, :8]).mean(axis=2)
    kernel[:, 8:] = np.nan
    model.decoder.kernel.assign(kernel)

    np.testing.assert_allclose(
        model.decode(tf.constant(latents)).numpy(), expected, rtol=1e-12
    )


def test_predict_is_mean_over_shots_of_per_weight_logits():
    rng = np.random.default_rng(1)
    model = fx.small_model(dtype="float64")
    inputs = rng.normal(size=(2, 3, 4, 8))
    weights = rng.normal(size=(2, 3, 2, 8))
    mask = rng.choice([0.0, 1.5], size=inputs.shape)
    expected = np.stack(
        [
            np.einsum("ijk,lmk->ijlm", inputs[b] * mask[b], weights[b]).mean(-1)
            for b in range(2)
        ]
    )

    logits = model.predict(
        tf.constant(inputs), tf.constant(weights.mean(axis=2)), tf.constant(mask)
    ).numpy()

    np.testing.assert_allclose(logits, expected, rtol=1e-10)


def test_model_graph_does_not_depend_on_the_host(monkeypatch):
    # The host's matmul form is the step's choice (steps.host_products), not
    # the model's: with or without a GPU, the model traces the same ops.
    model = fx.small_model(dtype="float64")
    inputs = tf.TensorSpec([2, 3, 4, 8], tf.float64)
    class_weights = tf.TensorSpec([2, 3, 8], tf.float64)

    def op_types():
        predict = tf.function(model.predict).get_concrete_function(
            inputs, class_weights
        )
        return [op.type for op in predict.graph.get_operations()]

    monkeypatch.setattr(runtime, "_has_gpu", lambda: False)
    without_gpu = op_types()
    monkeypatch.setattr(runtime, "_has_gpu", lambda: True)
    assert op_types() == without_gpu
    assert without_gpu.count("MatMul") == 2  # one per episode, B = 2


def test_support_loss_gradient_hand_computed():
    """N = 2, K = 1, c = 0: p = 1/2, so dL/dc[n] = sum_x (1/2 - y_n) x."""
    model = fx.small_model(dim=2, dtype="float64")
    inputs = np.array([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # class 0: e1, class 1: 2e2
    onehot = np.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    class_weights = np.zeros((1, 2, 2))
    # Class 0 weight: (1/2 - 1) e1 + (1/2 - 0) 2e2 = (-1/2, 1).
    expected = np.array([[[-0.5, 1.0], [0.5, -1.0]]])

    gradient = model.support_loss_gradient(inputs, onehot, class_weights).numpy()

    np.testing.assert_allclose(gradient, expected, atol=1e-12)


def test_support_loss_gradient_is_gradient_of_the_summed_loss():
    rng = np.random.default_rng(2)
    model = fx.small_model(dtype="float64")
    episodes = fx.random_episodes(3, batch=2, classes=3, shots=2)
    inputs = tf.cast(episodes.tr_input, tf.float64)
    onehot = tf.one_hot(episodes.tr_output[..., 0], 3, dtype=tf.float64)
    weights = tf.constant(rng.normal(size=(2, 3, 2, 8)))  # w[n, k], K = 2
    mask = tf.constant(rng.choice([0.0, 2.0], size=(2, 3, 2, 8)))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(weights)
        class_weights = tf.reduce_mean(weights, axis=2)
        logits = model.predict(inputs, class_weights, mask)
        per_example = tf.nn.softmax_cross_entropy_with_logits(onehot, logits)
        summed = tf.reduce_sum(per_example)
    expected = tape.gradient(summed, class_weights).numpy()
    per_weight = tape.gradient(summed, weights).numpy()

    gradient = model.support_loss_gradient(inputs, onehot, class_weights, mask)
    gradient = gradient.numpy()

    np.testing.assert_allclose(gradient, expected, rtol=1e-10, atol=1e-12)
    # The sum, not the mean: the mean's gradient is NK = 6 times smaller.
    assert np.abs(gradient).max() > 5 * np.abs(expected / 6).max()
    # The authors' gradient w.r.t. each of the K weights is 1/K of it.
    for k in range(2):
        np.testing.assert_allclose(
            per_weight[:, :, k], gradient / 2, rtol=1e-10, atol=1e-12
        )


# -------------------------------------------------------------- inner loops
class _QuadraticSupportLoss:
    """Replaces the support loss by a/2 ||c||^2 (gradient a c) for hand maths."""

    def __init__(self, coefficient):
        self.coefficient = coefficient

    def __call__(self, tr_input, tr_onehot, class_weights, dropout_mask):
        return self.coefficient * class_weights


def test_latent_inner_loop_scales_latents_by_the_known_factor(monkeypatch):
    """Decoder mean map M with M M^T = a I: each step maps z to (1 - lr c a) z."""
    config = fx.small_config(num_latents=2, inner_unroll_length=5)
    model = fx.small_model(config, dim=3, dtype="float64")
    mean_map = np.array([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0]])  # M M^T = 2 I
    model.decoder.kernel.assign(np.concatenate([mean_map, np.zeros((2, 3))], 1))
    model.inner_lr.assign([0.1, 0.2])
    coefficient = 0.5
    monkeypatch.setattr(
        model, "support_loss_gradient", _QuadraticSupportLoss(coefficient)
    )
    latents = np.array([[[[1.0, -2.0]], [[3.0, 0.5]]]])  # [1, 2, 1, 2]
    factors = (1 - np.array([0.1, 0.2]) * coefficient * 2.0) ** 5  # 0.9^5, 0.8^5

    adapted = model.leo_inner_loop(
        None, None, tf.constant(latents), model_lib._NO_NOISE
    ).numpy()

    np.testing.assert_allclose(adapted, latents * factors, rtol=1e-12)


def test_finetuning_loop_scales_weights_by_the_known_factor(monkeypatch):
    """dL/dc = c, so each of the K = 2 weights, and c, moves by lr c / 2."""
    config = fx.small_config(finetuning_unroll_length=5)
    model = fx.small_model(config, dim=3, dtype="float64")
    model.finetuning_lr.assign([0.1, 0.2, 0.4])
    monkeypatch.setattr(model, "support_loss_gradient", _QuadraticSupportLoss(1.0))
    tr_input = np.zeros((1, 2, 2, 3))  # only its K = 2 is used
    class_weights = np.arange(1.0, 7.0).reshape(1, 2, 3)

    adapted = model.finetuning_inner_loop(
        tf.constant(tr_input), None, tf.constant(class_weights), model_lib._NO_NOISE
    ).numpy()

    np.testing.assert_allclose(
        adapted, class_weights * (1 - np.array([0.05, 0.1, 0.2])) ** 5, rtol=1e-12
    )


# ------------------------------------------------- whole model vs reference
class _BothLosses(NamedTuple):
    """The model's and the reference's losses and gradients, side by side."""

    objective: model_lib.MetaBatchLoss
    gradients: list  # of objective.total, one per trainable variable
    reference: tf.Tensor  # the reference's total
    reference_losses: tf.Tensor  # [B]
    reference_accuracy: tf.Tensor  # [B]
    reference_gradients: list


def _both_losses(model, episodes, noise, first_order=False):
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        objective = model.meta_batch_loss(episodes, noise)
        reference, reference_losses, reference_accuracy = (
            reference_leo.reference_meta_batch_loss(model, episodes, noise, first_order)
        )
    return _BothLosses(
        objective,
        tape.gradient(objective.total, variables),
        reference,
        reference_losses,
        reference_accuracy,
        tape.gradient(reference, variables),
    )


@pytest.mark.parametrize(
    "training,kl_weight,rtol",
    [
        (True, 0.0, 1e-12),
        # With the KL term the reference's float64 log_prob loses ~6 digits of
        # (z - loc) / scale where scale sits at its 1e-10 floor (leo_tf computes
        # it from the noise), so the two agree to ~1e-8 only.
        (True, 0.1, 1e-6),
        (False, 0.1, 1e-12),
    ],
)
def test_model_matches_literal_reference_formulation(training, kl_weight, rtol):
    """Loss, accuracy and second-order gradients equal the authors' form."""
    model = fx.small_model(fx.small_config(kl_weight=kl_weight), dtype="float64")
    episodes = fx.random_episodes(7, batch=3, classes=3, shots=2, queries=4)
    noise = fx.noise_for(episodes, model.config, dtype=tf.float64) if training else None

    both = _both_losses(model, episodes, noise)

    objective = both.objective
    np.testing.assert_allclose(
        objective.episodes.loss.numpy(), both.reference_losses.numpy(), rtol=rtol
    )
    np.testing.assert_allclose(
        objective.episodes.accuracy.numpy(), both.reference_accuracy.numpy()
    )
    np.testing.assert_allclose(
        objective.total.numpy(), both.reference.numpy(), rtol=rtol
    )
    for variable, gradient, expected in zip(
        model.trainable_variables, both.gradients, both.reference_gradients
    ):
        scale = np.abs(expected.numpy()).max()
        np.testing.assert_allclose(
            gradient.numpy(),
            expected.numpy(),
            rtol=0,
            atol=rtol * scale,
            err_msg=variable.path,
        )
    if training:
        assert np.all(objective.episodes.kl.numpy() != 0)
        assert np.all(objective.episodes.encoder_penalty.numpy() > 0)
    else:
        assert np.all(objective.episodes.kl.numpy() == 0)
        assert np.all(objective.episodes.encoder_penalty.numpy() == 0)


def _perturbed_loss(loss_fn, variable, index, delta):
    original = variable.numpy()
    perturbed = original.copy()
    perturbed[index] += delta
    variable.assign(perturbed)
    loss = loss_fn().numpy()
    variable.assign(original)
    return loss


def test_outer_gradient_is_second_order_and_matches_finite_differences():
    # The encoder penalty's stop_gradient(adapted latents) makes the outer
    # gradient differ from the loss's derivative by design, so it is off here
    # (the reference test above covers it).
    config = fx.small_config(
        inner_unroll_length=2, finetuning_unroll_length=2, encoder_penalty_weight=0.0
    )
    model = fx.small_model(config, dim=6, dtype="float64", seed=3)
    episodes = fx.random_episodes(8, batch=2, classes=3, shots=2, queries=3, dim=6)
    noise = fx.noise_for(episodes, config, dtype=tf.float64)
    gradients = _both_losses(model, episodes, noise).gradients
    first_order = _both_losses(
        model, episodes, noise, first_order=True
    ).reference_gradients
    loss_fn = tf.function(lambda: model.meta_batch_loss(episodes, noise).total)
    rng = np.random.default_rng(0)
    delta = 1e-6
    differences = {}
    for variable, gradient, first in zip(
        model.trainable_variables, gradients, first_order
    ):
        for _ in range(4):
            index = tuple(rng.integers(0, s) for s in variable.shape)
            numeric = (
                _perturbed_loss(loss_fn, variable, index, delta)
                - _perturbed_loss(loss_fn, variable, index, -delta)
            ) / (2 * delta)
            assert gradient.numpy()[index] == pytest.approx(
                numeric, rel=1e-5, abs=1e-9
            ), variable.path
        differences[variable.path] = np.linalg.norm(
            gradient.numpy() - first.numpy()
        ) / np.linalg.norm(gradient.numpy())
    # Dropping the second-order terms changes the encoder, relation network
    # and decoder gradients measurably.
    network = [v.path for v in model.weight_matrices]
    assert min(differences[path] for path in network) > 0.1, differences


def test_meta_batch_gives_the_same_per_episode_results_as_single_episodes():
    model = fx.small_model()
    episodes = fx.random_episodes(9, batch=4)
    noise = fx.noise_for(episodes, model.config)

    batched = model.run_episodes(episodes, noise)

    for index in range(4):
        single = model.run_episodes(*steps.meta_batch_part(episodes, noise, index, 4))
        for name in ("loss", "accuracy", "kl", "encoder_penalty"):
            np.testing.assert_allclose(
                getattr(single, name).numpy()[0],
                getattr(batched, name).numpy()[index],
                rtol=1e-5,
                err_msg=name,
            )
        np.testing.assert_allclose(
            single.logits.numpy()[0],
            batched.logits.numpy()[index],
            rtol=1e-4,
            atol=1e-6,
        )


def test_evaluation_is_deterministic_and_uses_means():
    model = fx.small_model()
    episodes = fx.random_episodes(10)
    first = model.run_episodes(episodes).logits.numpy()
    second = model.run_episodes(episodes).logits.numpy()
    np.testing.assert_array_equal(first, second)
    # Meta-training noise changes the result; evaluation has none.
    noisy = model.run_episodes(episodes, fx.noise_for(episodes, model.config))
    assert np.abs(noisy.logits.numpy() - first).max() > 1e-4


def test_float32_agrees_with_float64():
    config = fx.small_config()
    model32 = fx.small_model(config, dtype="float32", seed=4)
    model64 = fx.small_model(config, dtype="float64", seed=4)
    for v32, v64 in zip(model32.trainable_variables, model64.trainable_variables):
        v64.assign(v32.numpy().astype(np.float64))
    episodes = fx.random_episodes(11)
    noise32 = fx.noise_for(episodes, config, dtype=tf.float32)
    noise64 = tf.nest.map_structure(lambda x: tf.cast(x, tf.float64), noise32)

    with tf.GradientTape(persistent=True) as tape:
        loss32 = model32.meta_batch_loss(episodes, noise32).total
        loss64 = model64.meta_batch_loss(episodes, noise64).total
    gradients32 = tape.gradient(loss32, model32.trainable_variables)
    gradients64 = tape.gradient(loss64, model64.trainable_variables)

    assert loss32.numpy() == pytest.approx(loss64.numpy(), rel=1e-5)
    for g32, g64 in zip(gradients32, gradients64):
        np.testing.assert_allclose(
            g32.numpy(), g64.numpy(), rtol=1e-3, atol=1e-5 * np.abs(g64.numpy()).max()
        )


def test_checkpoint_round_trip_restores_every_variable(tmp_path):
    model = fx.small_model(seed=1)
    saved = [v.numpy() for v in model.trainable_variables]
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    for variable in model.trainable_variables:
        variable.assign(tf.zeros_like(variable))

    tf.train.Checkpoint(model=model).read(path).assert_consumed()

    assert len(saved) == 7  # encoder, 3 relation kernels, decoder, 2 rates
    for variable, value in zip(model.trainable_variables, saved):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


def test_model_rebuilt_from_its_config_has_the_same_configuration_and_weights():
    model = fx.small_model(fx.small_config(kl_weight=0.25), dtype="float64", seed=3)

    rebuilt = model_lib.LEO.from_config(model.get_config())

    assert rebuilt.get_config() == model.get_config()
    assert rebuilt.config == model.config and rebuilt.embedding_dim == 8
    assert rebuilt.compute_dtype == "float64" and rebuilt.name == model.name
    # Equal seeds, equal initial weights (the learning rates at their inits).
    initial = model_lib.LEO(model.config, 8, seed=3, dtype="float64")
    for a, b in zip(initial.trainable_variables, rebuilt.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
