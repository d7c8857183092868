"""LEO written literally, per episode: the reference the model is checked against.

Not used by training, evaluation or export. It follows the structure of the
authors' TF1 code step by step, one episode at a time (`tf.map_fn` over the
meta-batch): explicit concatenated pairs in the relation network, logits as
a mean over k of per-weight products, `Normal.log_prob` for the KL, and
nested `tf.GradientTape`s over the summed softmax cross-entropy in both inner
loops. It shares only the variables with `leo_tf.model.LEO`, so agreement
between the two tests the maths, not the code (tests/test_model.py);
benchmarks/bench_step.py times it as the "map_fn formulation" baseline.
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from leo_tf import model as model_lib

tfd = tfp.distributions


def _dropout(inputs, mask):
    return inputs if mask is None else inputs * mask


def _distribution(parameters, stddev_offset):
    means, pre_stddev = tf.split(parameters, 2, axis=-1)
    stddev = tf.maximum(tf.exp(pre_stddev) - (1.0 - stddev_offset), 1e-10)
    return tfd.Normal(loc=means, scale=stddev)


def _support_loss(model, inputs, labels, weights, mask):
    """Per-example softmax CE [N, K]; logits = mean over k of products."""
    dropped = _dropout(inputs, mask)
    per_weight = tf.einsum("ijk,lmk->ijlm", dropped, weights)  # [N, K, N, K]
    logits = tf.reduce_mean(per_weight, axis=-1)
    onehot = tf.one_hot(labels[..., 0], tf.shape(inputs)[0], dtype=inputs.dtype)
    return tf.nn.softmax_cross_entropy_with_logits(onehot, logits), logits


def reference_episode(model, episode, noise=None, first_order=False):
    """One episode of LEO, literally. episode: tr_input [N, K, D] etc.

    noise: per-episode slices of EpisodeNoise fields (None for evaluation).
    first_order: stop gradients through the inner-loop gradients.
    Returns (episode loss, accuracy, kl, encoder_penalty).
    """
    tr_input, tr_output, val_input, val_output = episode
    config = model.config
    num_classes, num_shots, dim = tr_input.shape
    noise_at = (
        (lambda field, i=None: None)
        if noise is None
        else (
            lambda field, i=None: (
                getattr(noise, field) if i is None else getattr(noise, field)[i]
            )
        )
    )
    maybe_stop = tf.stop_gradient if first_order else (lambda x: x)

    # Encoder and relation network on explicit (NK)^2 concatenated pairs.
    codes = (
        tf.reshape(_dropout(tr_input, noise_at("encoder_dropout")), [-1, dim])
        @ model.encoder.kernel
    )
    total = num_classes * num_shots
    left = tf.tile(codes[:, None, :], [1, total, 1])
    right = tf.tile(codes[None, :, :], [total, 1, 1])
    hidden = tf.concat([left, right], axis=-1)
    kernels = model.relation_network.kernels
    for i, kernel in enumerate(kernels):
        hidden = tf.einsum("ijc,co->ijo", hidden, kernel)
        if i < len(kernels) - 1:
            hidden = tf.nn.relu(hidden)
    related = tf.reshape(tf.reduce_mean(hidden, axis=1), [num_classes, num_shots, -1])
    related = tf.tile(tf.reduce_mean(related, axis=1, keepdims=True), [1, num_shots, 1])
    latent_distribution = _distribution(related, 0.0)
    if noise is None:
        latents, kl = latent_distribution.mean(), tf.zeros([], tr_input.dtype)
    else:
        latents = latent_distribution.loc + latent_distribution.scale * noise_at(
            "latent"
        )
        prior = tfd.Normal(tf.zeros_like(latents), tf.ones_like(latents))
        kl = tf.reduce_mean(
            latent_distribution.log_prob(latents) - prior.log_prob(latents)
        )

    offset = np.sqrt(2.0 / (dim + num_classes))

    def forward_decoder(z, step):
        params = tf.einsum("nkl,lo->nko", z, model.decoder.kernel)
        distribution = _distribution(params, offset)
        weights = (
            distribution.mean()
            if noise is None
            else distribution.loc + distribution.scale * noise_at("weights", step)
        )
        loss, _ = _support_loss(
            model, tr_input, tr_output, weights, noise_at("support_dropout", step)
        )
        return loss, weights

    starting_latents = latents
    steps = config.inner_unroll_length
    for step in range(steps + 1):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(latents)
            loss, weights = forward_decoder(latents, step)
        if step < steps:
            gradient = maybe_stop(tape.gradient(loss, latents))
            latents = latents - model.inner_lr * gradient
        else:
            weight_gradient = maybe_stop(tape.gradient(loss, weights))
        del tape
    encoder_penalty = (
        tf.zeros([], tr_input.dtype)
        if noise is None
        else tf.reduce_mean(tf.square(starting_latents - tf.stop_gradient(latents)))
    )

    for step in range(config.finetuning_unroll_length):
        weights = weights - model.finetuning_lr * weight_gradient
        if step + 1 < config.finetuning_unroll_length:
            with tf.GradientTape() as tape:
                tape.watch(weights)
                loss, _ = _support_loss(
                    model,
                    tr_input,
                    tr_output,
                    weights,
                    noise_at("support_dropout", steps + step + 1),
                )
            weight_gradient = maybe_stop(tape.gradient(loss, weights))

    val_loss, logits = _support_loss(
        model, val_input, val_output, weights, noise_at("query_dropout")
    )
    accuracy = tf.reduce_mean(
        tf.cast(
            tf.equal(tf.argmax(logits, -1, output_type=tf.int32), val_output[..., 0]),
            tr_input.dtype,
        )
    )
    loss = (
        tf.reduce_mean(val_loss)
        + config.kl_weight * kl
        + config.encoder_penalty_weight * encoder_penalty
    )
    return loss, accuracy, kl, encoder_penalty


def reference_episode_losses(model, episodes, noise=None, first_order=False):
    """tf.map_fn of reference_episode over the meta-batch.

    Returns (per-episode losses [B], accuracies [B]).
    """
    dtype = model.compute_dtype
    inputs = (
        tf.cast(episodes.tr_input, dtype),
        episodes.tr_output,
        tf.cast(episodes.val_input, dtype),
        episodes.val_output,
    )
    if noise is None:

        def one(episode):
            return reference_episode(model, episode, None, first_order)[:2]

        return tf.map_fn(one, inputs, fn_output_signature=(dtype, dtype))
    # Move the step axis of the stacked noise behind the batch axis.
    per_episode_noise = noise._replace(
        weights=tf.transpose(noise.weights, [1, 0, 2, 3, 4]),
        support_dropout=tf.transpose(noise.support_dropout, [1, 0, 2, 3, 4]),
    )

    def one_with_noise(args):
        episode, episode_noise = args
        return reference_episode(model, episode, episode_noise, first_order)[:2]

    return tf.map_fn(
        one_with_noise, (inputs, per_episode_noise), fn_output_signature=(dtype, dtype)
    )


def reference_penalties(model):
    """(l2, orthogonality): sum(w^2)/2 over the weight matrices, mean((C - I)^2)."""
    l2 = tf.add_n([tf.reduce_sum(tf.square(w)) / 2 for w in model.weight_matrices])
    kernel = tf.convert_to_tensor(model.decoder.kernel)
    norms = tf.norm(kernel, axis=1, keepdims=True) + 1e-32
    cosine = (kernel @ tf.transpose(kernel)) / (norms @ tf.transpose(norms))
    orthogonality = tf.reduce_mean(
        tf.square(cosine - tf.eye(kernel.shape[0], dtype=model.compute_dtype))
    )
    return l2, orthogonality


def reference_meta_batch_loss(model, episodes, noise=None, first_order=False):
    """The episodes' mean loss plus penalties.

    Returns (total loss, per-episode losses [B], accuracies [B]).
    """
    losses, accuracies = reference_episode_losses(model, episodes, noise, first_order)
    l2, orthogonality = reference_penalties(model)
    total = (
        tf.reduce_mean(losses)
        + model.config.l2_penalty_weight * l2
        + model.config.orthogonality_penalty_weight * orthogonality
    )
    return total, losses, accuracies


class ReferenceModel:
    """leo_tf's model interface over the reference formulation.

    Lets `leo_tf.steps` compile the reference like the shipped model (the
    benchmark's "map_fn" variant). Metrics the reference does not compute
    separately (KL, encoder penalty, latents) are reported as zeros.
    """

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.compute_dtype = model.compute_dtype
        self.trainable_variables = model.trainable_variables
        self.weight_matrices = model.weight_matrices
        self.matmul = None  # unused: the reference has no batched matmul

    def run_episodes(self, episodes, noise=None):
        """The reference's EpisodeOutputs."""
        losses, accuracies = reference_episode_losses(self.model, episodes, noise)
        zeros = tf.zeros_like(losses)
        return model_lib.EpisodeOutputs(
            loss=losses,
            query_loss=losses,
            accuracy=accuracies,
            kl=zeros,
            encoder_penalty=zeros,
            latents=tf.zeros([1], losses.dtype),
            logits=tf.zeros([1], losses.dtype),
        )

    def objective(self, outputs):
        """The reference's MetaBatchLoss of its EpisodeOutputs."""
        l2, orthogonality = reference_penalties(self.model)
        penalties = (
            self.config.l2_penalty_weight * l2
            + self.config.orthogonality_penalty_weight * orthogonality
        )
        total = tf.reduce_mean(outputs.loss) + penalties
        return model_lib.MetaBatchLoss(total, outputs, l2, orthogonality, penalties)
