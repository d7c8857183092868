"""The paper's ablations as unroll lengths of 0, checked against NumPy.

--inner_unroll_length=S and --finetuning_unroll_length=F:
  0/0  conditional generator only: the weights decoded from the initial codes
  0/F  the generator, then F finetuning steps on its weights
  S/0  LEO without finetuning: the weights decoded from the adapted codes
  S/F  full LEO
The encoder and relation network (model.encode) give the initial codes; the
loops and the decoder are recomputed here in float64 NumPy.
"""

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from leo_tf import config as config_lib
from leo_tf import evaluation
from leo_tf import export as export_lib
from leo_tf import trainer
from leo_tf.model import LEO
from tests import model_fixtures as fx

FLAGS = flags.FLAGS


def _softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _decode(latents, mean_map):
    """Class weights [B, N, D]: mean over k of the codes [B, N, K, L], mapped."""
    return latents.mean(axis=2) @ mean_map


def _support_gradient(inputs, class_weights):
    """d/dc of the summed support cross-entropy; inputs [B, N, K, D], labels n."""
    logits = np.einsum("bnkd,bmd->bnkm", inputs, class_weights)
    residual = _softmax(logits) - np.eye(inputs.shape[1])[None, :, None, :]
    return np.einsum("bnkm,bnkd->bmd", residual, inputs)


def _latent_loop(inputs, latents, mean_map, learning_rate, steps):
    """dL/dz[n, k] = dL/dc[n] M^T / K, since c[n] = mean_k z[n, k] M."""
    num_shots = inputs.shape[2]
    for _ in range(steps):
        gradient = _support_gradient(inputs, _decode(latents, mean_map))
        latents = (
            latents - learning_rate * (gradient @ mean_map.T / num_shots)[:, :, None, :]
        )
    return latents


def _finetuning(inputs, class_weights, learning_rate, steps):
    """Each of the K weights of class n, so their mean, moves by lr dL/dc / K."""
    for _ in range(steps):
        gradient = _support_gradient(inputs, class_weights)
        class_weights = class_weights - learning_rate * gradient / inputs.shape[2]
    return class_weights


def _adapt_both_ways(inner, finetuning):
    """(model.adapt's Adaptation, NumPy's class weights, NumPy's adapted codes)."""
    config = fx.small_config(
        inner_unroll_length=inner, finetuning_unroll_length=finetuning
    )
    model = fx.small_model(config, dtype="float64")
    episodes = fx.random_episodes(3)
    adaptation = model.adapt(episodes.tr_input, episodes.tr_output)

    inputs = episodes.tr_input.numpy().astype(np.float64)
    initial = model.encode(tf.constant(inputs)).mean().numpy()
    mean_map = model.decoder.kernel_halves()[0].numpy()
    adapted = _latent_loop(inputs, initial, mean_map, model.inner_lr.numpy(), inner)
    weights = _finetuning(
        inputs, _decode(adapted, mean_map), model.finetuning_lr.numpy(), finetuning
    )
    np.testing.assert_allclose(adaptation.latents.numpy(), initial, rtol=1e-12)
    return adaptation, weights, adapted


def test_without_both_loops_the_weights_are_the_decoded_initial_codes():
    adaptation, weights, _ = _adapt_both_ways(0, 0)

    np.testing.assert_array_equal(
        adaptation.adapted_latents.numpy(), adaptation.latents.numpy()
    )
    np.testing.assert_allclose(adaptation.class_weights.numpy(), weights, rtol=1e-10)


def test_generator_and_finetuning_finetune_the_decoded_initial_codes():
    adaptation, weights, _ = _adapt_both_ways(0, 3)

    np.testing.assert_array_equal(
        adaptation.adapted_latents.numpy(), adaptation.latents.numpy()
    )
    np.testing.assert_allclose(adaptation.class_weights.numpy(), weights, rtol=1e-10)


def test_leo_without_finetuning_decodes_the_adapted_codes():
    adaptation, weights, adapted = _adapt_both_ways(3, 0)

    np.testing.assert_allclose(adaptation.adapted_latents.numpy(), adapted, rtol=1e-10)
    np.testing.assert_allclose(adaptation.class_weights.numpy(), weights, rtol=1e-10)
    assert np.abs(adapted - adaptation.latents.numpy()).max() > 1e-3


def test_full_leo_finetunes_the_weights_of_the_adapted_codes():
    adaptation, weights, adapted = _adapt_both_ways(2, 3)

    np.testing.assert_allclose(adaptation.adapted_latents.numpy(), adapted, rtol=1e-10)
    np.testing.assert_allclose(adaptation.class_weights.numpy(), weights, rtol=1e-10)


@pytest.fixture
def _fresh_flags():
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        yield
    FLAGS.unparse_flags()


@pytest.mark.slow
def test_the_generator_alone_trains_evaluates_and_exports(
    toy_data, tmp_path, _fresh_flags
):
    """--inner_unroll_length=0 --finetuning_unroll_length=0 end to end: the
    SavedModel's logits are the queries' products with the decoded codes."""
    config_lib.define_flags()
    FLAGS(
        [
            "leo_tf.train",
            f"--data_path={toy_data}",
            "--dataset_name=toy",
            f"--checkpoint_path={tmp_path / 'run'}",
            "--inner_unroll_length=0",
            "--finetuning_unroll_length=0",
            "--num_latents=8",
            "--num_steps_limit=10",
            "--checkpoint_steps=10",
            "--metatrain_batch_size=4",
            "--metavalid_batch_size=20",
            "--metatest_batch_size=50",
            "--num_metatest_episodes=100",
        ]
    )
    config = config_lib.from_flags()

    trainer.train(config)
    results = evaluation.evaluate(config)
    exported = export_lib.export(config.train.checkpoint_path, tmp_path / "export")

    assert 0.0 < results["accuracy"] <= 1.0
    model = LEO(config.model, 16)
    best = tf.train.latest_checkpoint(str(tmp_path / "run" / "best_checkpoint"))
    tf.train.Checkpoint(model=model).restore(best).expect_partial()
    rng = np.random.default_rng(0)
    support = rng.normal(size=(5, 2, 16)).astype(np.float32)
    query = rng.normal(size=(7, 16)).astype(np.float32)
    serving = tf.saved_model.load(str(exported)).signatures["serving_default"]
    logits = serving(support=tf.constant(support), query=tf.constant(query))

    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    codes = model.encode(tf.constant(unit(support))[None]).mean().numpy()
    weights = _decode(codes, model.decoder.kernel_halves()[0].numpy())[0]
    np.testing.assert_allclose(
        logits["logits"].numpy(), unit(query) @ weights.T, rtol=1e-4, atol=1e-6
    )
