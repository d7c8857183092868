"""Small random episodes, noise and models shared by the model tests."""

import collections

import numpy as np
import tensorflow as tf

from leo_tf.config import ModelConfig
from leo_tf.model import LEO
from leo_tf.noise import draw_noise

Episodes = collections.namedtuple("Episodes", "tr_input tr_output val_input val_output")


def random_episodes(seed, batch=3, classes=3, shots=2, queries=4, dim=8):
    """Random L2-normalised episodes with labels 0..N-1 in class order."""
    rng = np.random.default_rng(seed)

    def inputs(count):
        x = rng.normal(size=(batch, classes, count, dim))
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    def labels(count):
        return np.broadcast_to(
            np.arange(classes, dtype=np.int32)[None, :, None, None],
            (batch, classes, count, 1),
        ).copy()

    return Episodes(
        tf.constant(inputs(shots)),
        tf.constant(labels(shots)),
        tf.constant(inputs(queries)),
        tf.constant(labels(queries)),
    )


def episodes_spec(batch_size, num_classes, num_tr, num_val, embedding_dim):
    """TensorSpecs of a meta-batch of Episodes with these sizes."""
    support = [batch_size, num_classes, num_tr]
    query = [batch_size, num_classes, num_val]
    return Episodes(
        tr_input=tf.TensorSpec(support + [embedding_dim], tf.float32),
        tr_output=tf.TensorSpec(support + [1], tf.int32),
        val_input=tf.TensorSpec(query + [embedding_dim], tf.float32),
        val_output=tf.TensorSpec(query + [1], tf.int32),
    )


def noise_for(episodes, config, seed=(1, 2), dtype=tf.float32):
    return draw_noise(
        seed,
        episodes.tr_input.shape,
        episodes.val_input.shape,
        num_latents=config.num_latents,
        inner_unroll_length=config.inner_unroll_length,
        finetuning_unroll_length=config.finetuning_unroll_length,
        dropout_rate=config.dropout_rate,
        dtype=dtype,
    )


def small_config(**overrides):
    """A tiny model with every penalty switched on, for exact checks."""
    values = dict(
        num_latents=4,
        inner_unroll_length=3,
        finetuning_unroll_length=3,
        inner_lr_init=1.0,
        finetuning_lr_init=0.1,
        dropout_rate=0.3,
        kl_weight=0.1,
        encoder_penalty_weight=0.01,
        l2_penalty_weight=1e-3,
        orthogonality_penalty_weight=0.01,
    )
    values.update(overrides)
    return ModelConfig(**values)


def small_model(config=None, dim=8, dtype="float32", seed=0):
    """A built LEO whose learning-rate vectors are perturbed per element."""
    config = config or small_config()
    model = LEO(config, dim, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    model.inner_lr.assign(
        config.inner_lr_init * rng.uniform(0.5, 1.5, size=model.inner_lr.shape)
    )
    model.finetuning_lr.assign(
        config.finetuning_lr_init
        * rng.uniform(0.5, 1.5, size=model.finetuning_lr.shape)
    )
    return model
