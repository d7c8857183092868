"""The compiled meta-training step (evaluation: meta_eval.py).

The meta-training step differentiates the meta-batch loss through both inner
loops (second order), replaces NaN gradients by a weight-decay pull (the
authors' guard), clips each gradient tensor by value then by norm, and
applies Adam. On CPUs the meta-batch runs as towers side by side, and the
steps give the model the batched matmul that suits the host
(`host_products`).
"""

import contextlib
from typing import NamedTuple

import keras
import tensorflow as tf

from leo_tf import ops, runtime
from leo_tf.model import EpisodeOutputs
from leo_tf.noise import EpisodeNoise, noise_shapes

# Weight of the fallback L2 objective used when the loss or a gradient is NaN.
_NAN_FALLBACK_L2_WEIGHT = 1e-4


class TrainMetrics(NamedTuple):
    """Scalars of one meta-training step (means over the meta-batch)."""

    loss: tf.Tensor  # total objective (NaN if the guard fired)
    query_loss: tf.Tensor
    accuracy: tf.Tensor
    kl: tf.Tensor
    encoder_penalty: tf.Tensor
    l2: tf.Tensor
    orthogonality: tf.Tensor
    gradient_norm: tf.Tensor  # global norm of the gradients before clipping
    nan_guard: tf.Tensor  # bool: the NaN guard replaced the gradients
    latents: tf.Tensor  # [B, N, K, L] initial latent codes


def make_optimizer(config):
    """Adam with the authors' TF1 defaults (epsilon 1e-8)."""
    return keras.optimizers.Adam(learning_rate=config.outer_lr, epsilon=1e-8)


def nan_guarded_gradients(loss, gradients, variables, weight_matrices):
    """Replaces the gradients by those of 1e-4 * sum(w^2)/2 if any is NaN.

    As in the authors' code, the guard fires on a NaN loss or a NaN in any
    gradient; infinite gradients are left to the value clipping.

    Args:
      loss: scalar.
      gradients: list of tensors, one per variable.
      variables: the trainable variables.
      weight_matrices: the variables the fallback decays (others get zeros).

    Returns:
      (gradients, fired): the gradients to apply and a bool scalar.
    """
    fired = tf.math.is_nan(loss)
    for gradient in gradients:
        fired = tf.logical_or(fired, tf.reduce_any(tf.math.is_nan(gradient)))
    decayed = {id(w) for w in weight_matrices}
    fallback = [
        (
            _NAN_FALLBACK_L2_WEIGHT * tf.convert_to_tensor(v)
            if id(v) in decayed
            else tf.zeros_like(g)
        )
        for g, v in zip(gradients, variables)
    ]
    guarded = [tf.where(fired, f, g) for f, g in zip(fallback, gradients)]
    return guarded, fired


def clip_gradients(gradients, value_threshold, norm_threshold):
    """Clips each tensor to [-value, value], then each to norm <= norm."""
    if value_threshold > 0:
        gradients = [
            tf.clip_by_value(g, -value_threshold, value_threshold) for g in gradients
        ]
    if norm_threshold > 0:
        gradients = [tf.clip_by_norm(g, norm_threshold) for g in gradients]
    return gradients


def host_matmul():
    """The model's batched matmul for this host: the faster form of each.

    `ops.per_episode_matmul` on CPUs, one batched `tf.matmul` on GPUs; the
    two compute the same product.
    """
    return ops.per_episode_matmul if runtime.unbatched_matmuls() else tf.matmul


def host_products(model):
    """Within it, `model.matmul` is `host_matmul()`; on leaving, the model's own.

    What the model traces inside (the training steps) takes the host's form;
    the model alone traces the same ops on every host.
    """
    return products(model, host_matmul())


@contextlib.contextmanager
def products(model, matmul):
    """Within it, `model.matmul` is `matmul`; on leaving, the model's own."""
    own, model.matmul = model.matmul, matmul
    try:
        yield model
    finally:
        model.matmul = own


def meta_batch_part(episodes, noise, index, num_parts):
    """Part `index` (int or int tensor) of a meta-batch cut in equal parts.

    Returns (episodes, noise) of B / num_parts episodes; noise may be None.
    The noise's `weights` and `support_dropout` carry a leading step axis
    ([steps, B, ...]); the part's are tuples of per-step [B / num_parts, ...]
    tensors: slicing each step along its leading (batch) axis takes views of
    contiguous memory, where slicing the stack along its second axis copies.
    """
    size = tf.shape(episodes.tr_input)[0] // num_parts
    begin, end = index * size, (index + 1) * size
    part = type(episodes)(*(x[begin:end] for x in episodes))
    if noise is None:
        return part, None

    def per_step(stack):
        return tuple(x[begin:end] for x in tf.unstack(stack))

    return part, noise._replace(
        encoder_dropout=noise.encoder_dropout[begin:end],
        latent=noise.latent[begin:end],
        weights=per_step(noise.weights),
        support_dropout=per_step(noise.support_dropout),
        query_dropout=noise.query_dropout[begin:end],
    )


def run_towers(model, episodes, noise, num_towers):
    """`model.run_episodes` on each of num_towers equal parts of the meta-batch.

    The parts' ops are independent, so a CPU's inter-op threads compute them
    side by side; B must be a multiple of num_towers. Returns a list of
    num_towers EpisodeOutputs of B / num_towers episodes, in batch order.
    """
    if num_towers == 1:
        return [model.run_episodes(episodes, noise)]
    return [
        model.run_episodes(*meta_batch_part(episodes, noise, i, num_towers))
        for i in range(num_towers)
    ]


def _concatenated(towers):
    """One EpisodeOutputs of the towers' EpisodeOutputs, in their order."""
    return EpisodeOutputs(*(tf.concat(parts, 0) for parts in zip(*towers)))


def _build_optimizer(optimizer, variables):
    # Creating Adam's slots up front keeps variable creation out of the trace,
    # so the compiled step traces once.
    if not optimizer.built:
        optimizer.build(variables)


def _tower_gradients(model, episodes, noise, batch_size, scale):
    """(gradients, EpisodeOutputs) of one tower's episodes.

    The gradients are those of scale * (sum of the tower's episode losses)
    / batch_size, one per trainable variable (None where unconnected), the
    EpisodeOutputs those of `model.run_episodes` on the tower's episodes
    (with the model's matmul at the time of tracing, `host_products`).
    """
    with tf.GradientTape() as tape:
        outputs = model.run_episodes(episodes, noise)
        share = tf.reduce_sum(outputs.loss) / batch_size * scale
    return tape.gradient(share, model.trainable_variables), outputs


def _scaled_gradients(model, episodes, noise, scale, num_towers):
    """Gradients of scale * meta-batch loss, and the (unscaled) objective.

    The meta-batch runs as num_towers towers (`meta_batch_part`), each
    differentiating its share of the mean episode loss
    (`_tower_gradients`); the penalties are differentiated on their own,
    and each variable's gradients are summed in a fixed order. Taken at
    once, a variable's contributions from the towers and the penalties
    would meet in one AddN, whose CPU kernel accumulates into the first
    input buffer it can reuse at run time: with towers running side by
    side, that input, and so the order of the float additions, changed from
    run to run, and equal seeds gave different weights (README,
    Reproducibility).
    """
    batch_size = tf.cast(tf.shape(episodes.tr_input)[0], model.compute_dtype)
    if num_towers == 1:
        parts = [(episodes, noise)]
    else:
        parts = [
            meta_batch_part(episodes, noise, i, num_towers) for i in range(num_towers)
        ]
    per_term, towers = [], []
    for part in parts:
        gradients, outputs = _tower_gradients(model, *part, batch_size, scale)
        per_term.append(gradients)
        towers.append(outputs)
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        objective = model.objective(_concatenated(towers))
        penalties = objective.penalties * scale
    per_term.append(tape.gradient(penalties, variables))
    gradients = [
        _fixed_order_sum([g for g in parts if g is not None], v)
        for v, *parts in zip(variables, *per_term)
    ]
    return gradients, objective


def _fixed_order_sum(tensors, variable):
    """The sum of same-shape tensors, added in one fixed order.

    A reduction over a stacked axis, not `+` or tf.add_n: Grappler rewrites
    chains of adds into an AddN (see `_scaled_gradients`). No tensors (a
    variable no term depends on, e.g. the finetuning rate with
    --finetuning_unroll_length=0) give zeros of the variable's shape.
    (Zeros by hand: tape.gradient's unconnected_gradients=ZERO fails on
    Keras 3 variables in TF 2.21, whose dtype is a string.)
    """
    if not tensors:
        return tf.zeros(variable.shape, variable.dtype)
    if len(tensors) == 1:
        return tensors[0]
    return tf.reduce_sum(tf.stack(tensors), axis=0)


def _scalar_metrics(objective, scale=1.0):
    """The objective's scalars (means over episodes), times `scale`."""
    outputs = objective.episodes
    return {
        "loss": objective.total * scale,
        "query_loss": tf.reduce_mean(outputs.query_loss) * scale,
        "accuracy": tf.reduce_mean(outputs.accuracy) * scale,
        "kl": tf.reduce_mean(outputs.kl) * scale,
        "encoder_penalty": tf.reduce_mean(outputs.encoder_penalty) * scale,
        "l2": objective.l2 * scale,
        "orthogonality": objective.orthogonality * scale,
    }


def _guard_and_clip(model, config, loss, gradients):
    """NaN guard then clipping; returns (gradients, norm before clipping, fired)."""
    gradients, fired = nan_guarded_gradients(
        loss, gradients, model.trainable_variables, model.weight_matrices
    )
    gradient_norm = tf.linalg.global_norm(gradients)
    gradients = clip_gradients(
        gradients, config.gradient_threshold, config.gradient_norm_threshold
    )
    return gradients, gradient_norm, fired


def train_step_fn(model, optimizer, config, num_towers=1):
    """The uncompiled meta-training step: (episodes, noise) -> TrainMetrics.

    num_towers: see `run_towers`.
    """
    _build_optimizer(optimizer, model.trainable_variables)

    def step(episodes, noise):
        with host_products(model):
            gradients, objective = _scaled_gradients(
                model, episodes, noise, 1.0, num_towers
            )
        gradients, gradient_norm, fired = _guard_and_clip(
            model, config, objective.total, gradients
        )
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return TrainMetrics(
            **_scalar_metrics(objective),
            gradient_norm=gradient_norm,
            nan_guard=fired,
            latents=objective.episodes.latents,
        )

    return step


def distributed_train_step_fn(strategy, model, optimizer, config):
    """The meta-training step with the meta-batch split over replicas.

    Every replica takes its own contiguous 1/R of the meta-batch (so no two
    replicas see the same episode) and differentiates 1/R of its meta-batch
    loss: with equal shares, the sum over replicas is the loss of the whole
    meta-batch, so the summed (all-reduced) gradients equal the single-device
    ones. The NaN guard and clipping then act on those summed gradients,
    identically on every replica, and Adam applies them, as on one device.
    """
    with strategy.scope():
        _build_optimizer(optimizer, model.trainable_variables)
    replicas = strategy.num_replicas_in_sync

    def replica_step(episodes, noise):
        context = tf.distribute.get_replica_context()
        replica = context.replica_id_in_sync_group
        episodes, noise = meta_batch_part(episodes, noise, replica, replicas)
        gradients, objective = _scaled_gradients(
            model, episodes, noise, 1 / replicas, 1
        )
        total = tf.distribute.ReduceOp.SUM
        gradients = context.all_reduce(total, gradients)
        metrics = context.all_reduce(total, _scalar_metrics(objective, 1 / replicas))
        gradients, gradient_norm, fired = _guard_and_clip(
            model, config, metrics["loss"], gradients
        )
        # Keras's apply_gradients sums what every replica passes once more;
        # only replica 0 passes the gradients, so that sum is exactly them.
        gradients = [tf.where(replica == 0, g, tf.zeros_like(g)) for g in gradients]
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return TrainMetrics(
            **metrics,
            gradient_norm=gradient_norm,
            nan_guard=fired,
            latents=objective.episodes.latents,
        )

    def step(episodes, noise):
        # Set outside strategy.run, whose replicas may trace in threads.
        with host_products(model):
            metrics = strategy.run(replica_step, (episodes, noise))
        # Every replica holds the same reduced metrics: report the first's.
        return tf.nest.map_structure(
            lambda x: strategy.experimental_local_results(x)[0], metrics
        )

    return step


def _noise_spec(episodes_spec, model_config, dtype=tf.float32):
    """TensorSpecs of the EpisodeNoise that goes with `episodes_spec`."""
    shapes = noise_shapes(
        episodes_spec.tr_input.shape.as_list(),
        episodes_spec.val_input.shape.as_list(),
        num_latents=model_config.num_latents,
        inner_unroll_length=model_config.inner_unroll_length,
        finetuning_unroll_length=model_config.finetuning_unroll_length,
    )
    return EpisodeNoise(*(tf.TensorSpec(shape, dtype) for shape in shapes))


def compile_train_step(
    model,
    optimizer,
    config,
    episodes_spec,
    jit_compile=False,
    strategy=None,
    num_towers=1,
):
    """The meta-training step as a tf.function traced once for these shapes.

    With a tf.distribute `strategy`, the meta-batch is split over its
    replicas; otherwise into num_towers parts run side by side.
    """
    if strategy is None:
        step = train_step_fn(model, optimizer, config, num_towers)
    else:
        step = distributed_train_step_fn(strategy, model, optimizer, config)
    return tf.function(
        step,
        input_signature=[
            episodes_spec,
            _noise_spec(episodes_spec, model.config, model.compute_dtype),
        ],
        jit_compile=jit_compile,
    )
