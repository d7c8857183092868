"""LEO (Rusu et al., 2019, Section 3): few-shot classifiers adapted in a latent space.

A meta-batch of B independent N-way K-shot episodes runs at once, batch axis
first: support `[B, N, K, D]`, query `[B, N, V, D]`, codes `[B, N, K, L]`.

Every code z[n, k] decodes into (in meta-training, is sampled as) classifier
weights w[n, k]; the classifier uses only their class mean c[n] = mean_k
w[n, k] (its logits mean_k <x, w[n, k]> = <x, c[n]>), and finetuning moves the
K weights of a class alike, so the model carries c `[B, N, D]`.

Meta-training and evaluation differ only in the `EpisodeNoise` passed in:
with it, inputs are dropped out and codes and weights are reparameterised
samples; without it, no dropout, the means, and no KL term or encoder penalty.
"""

import dataclasses
from typing import NamedTuple

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from leo_tf import gaussians, layers, ops
from leo_tf.config import ModelConfig
from leo_tf.noise import EpisodeNoise

_NO_NOISE = EpisodeNoise(None, None, None, None, None)


class EpisodeOutputs(NamedTuple):
    """Per-episode results of one forward pass."""

    loss: tf.Tensor  # [B] query CE + kl_weight KL + gamma penalty
    query_loss: tf.Tensor  # [B] mean query cross-entropy
    accuracy: tf.Tensor  # [B] fraction of query examples right
    kl: tf.Tensor  # [B] single-sample KL estimate (0 in eval)
    encoder_penalty: tf.Tensor  # [B] ||z - stop_gradient(z')||^2 mean (0 in eval)
    latents: tf.Tensor  # [B, N, K, L] codes before adaptation
    logits: tf.Tensor  # [B, N, V, N] query logits


class Adaptation(NamedTuple):
    """What adapting to a support set produces."""

    latent_distribution: tfp.distributions.Normal  # over [B, N, K, L]
    latents: tf.Tensor  # [B, N, K, L] sampled (or mean) initial codes
    adapted_latents: tf.Tensor  # [B, N, K, L] after the latent inner loop
    class_weights: tf.Tensor  # [B, N, D] mean_k w[n, k] after finetuning


class MetaBatchLoss(NamedTuple):
    """The meta-training objective and its parts."""

    total: tf.Tensor  # scalar: mean episode loss + penalties
    episodes: EpisodeOutputs
    l2: tf.Tensor  # scalar, sum over weight matrices of sum(w^2)/2
    orthogonality: tf.Tensor  # scalar, decoder orthogonality penalty
    penalties: tf.Tensor  # scalar, the weighted l2 and orthogonality


def _pick(stack, index):
    """stack[index], or None where there is no noise (evaluation)."""
    return None if stack is None else stack[index]


class LEO(keras.layers.Layer):
    """The LEO model; see the module docstring for shapes and modes.

    `matmul`, the classifier's batched product, is `ops.per_episode_matmul`
    or `tf.matmul`: equal values, in the form a host runs best (the compiled
    steps set the host's, `steps.host_products`).
    """

    def __init__(
        self, config, embedding_dim, seed=None, dtype="float32", name="leo", **kwargs
    ):
        """config: ModelConfig; embedding_dim: D; seed: of the initialisers."""
        super().__init__(dtype=dtype, name=name, **kwargs)
        self.config, self.embedding_dim, self.seed = config, embedding_dim, seed
        self.matmul = ops.per_episode_matmul
        self.encoder, self.relation_network, self.decoder = layers.networks(
            embedding_dim, config.num_latents, embedding_dim, seed, dtype
        )
        self.inner_lr = layers.add_rate(
            self, "inner_lr", config.num_latents, config.inner_lr_init
        )
        self.finetuning_lr = layers.add_rate(
            self, "finetuning_lr", embedding_dim, config.finetuning_lr_init
        )
        self.built = True

    @property
    def weight_matrices(self):
        """The kernels that the L2 penalty covers (not the learning rates)."""
        return layers.network_kernels(self.encoder, self.relation_network, self.decoder)

    def encode(self, tr_input, dropout_mask=None):
        """tr_input: [B, N, K, D] -> Normal over latent codes [B, N, K, L]."""
        related = self.relation_network(self.encoder(tr_input, dropout_mask))
        return gaussians.gaussian(related)

    def decode(self, latents, standard_noise=None, decoder_halves=None):
        """Class weights c[n] = mean_k w[n, k] `[B, N, D]` from codes `[B, N, K, L]`.

        w[n, k] ~ Normal(z W_mu, max(exp(z W_u) - (1 - sqrt(2 / (D + N))), 1e-10))
        is sampled as loc + scale * eps with standard_noise eps `[B, N, K, D]`,
        or is its mean when eps is None. loc is linear in z, so c[n] = (mean_k
        z[n, k]) W_mu + mean_k scale[n, k] eps[n, k]. decoder_halves: W_mu, W_u
        (`self.decoder.kernel_halves()`, split once per step), or None.
        """
        mean_latents = layers.mean_along(latents, axis=2)
        class_loc = self.decoder.loc(mean_latents, decoder_halves)  # [B, N, D]
        if standard_noise is None:
            return class_loc
        num_classes = tf.cast(tf.shape(latents)[1], self.compute_dtype)
        offset = tf.sqrt(2.0 / (self.embedding_dim + num_classes))
        pre_stddev = self.decoder.pre_stddev(latents, decoder_halves)
        scale = gaussians.weight_stddev(pre_stddev, offset)  # [B, N, K, D]
        return class_loc + layers.mean_along(scale * standard_noise, axis=2)

    def predict(self, inputs, class_weights, dropout_mask=None):
        """Logits <x, c[n]> `[B, G, M, N]` of inputs `[B, G, M, D]` (G groups of M).

        class_weights: [B, N, D]; dropout_mask: like inputs, or None.
        """
        inputs = layers.apply_dropout(inputs, dropout_mask)
        flat = ops.flatten_examples(inputs)  # [B, G * M, D]
        logits = self.matmul(flat, class_weights, transpose_b=True)
        shape = tf.concat([tf.shape(inputs)[:3], tf.shape(class_weights)[1:2]], 0)
        return tf.reshape(logits, shape)

    def support_loss_gradient(
        self, tr_input, tr_onehot, class_weights, dropout_mask=None
    ):
        """d/dc[n] of the SUM of the support cross-entropies: sum_x (p - y)_n x.

        tr_input, dropout_mask: [B, N, K, D]; tr_onehot: [B, N, K, N] labels;
        class_weights: [B, N, D] -> [B, N, D]. The authors' gradient w.r.t. each
        of the K weights w[n, k] is this / K. The outer tape differentiates
        through this closed form, so second-order gradients stay exact.
        """
        inputs = layers.apply_dropout(tr_input, dropout_mask)
        residual = tf.nn.softmax(self.predict(inputs, class_weights)) - tr_onehot
        flat = ops.flatten_examples
        return self.matmul(flat(residual), flat(inputs), transpose_a=True)

    def leo_inner_loop(self, tr_input, tr_onehot, latents, noise, decoder_halves=None):
        """S steps of z <- z - inner_lr * dL_tr/dz on codes `[B, N, K, L]`.

        L_tr, the summed support loss of the weights decoded (re-sampled in
        meta-training) from z, has its closed-form dL_tr/dc carried back to z.
        """
        for step in range(self.config.inner_unroll_length):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(latents)
                weight_noise = _pick(noise.weights, step)
                class_weights = self.decode(latents, weight_noise, decoder_halves)
            dropout_mask = _pick(noise.support_dropout, step)
            class_gradient = self.support_loss_gradient(
                tr_input, tr_onehot, class_weights, dropout_mask
            )
            latent_gradient = tape.gradient(
                class_weights, latents, output_gradients=class_gradient
            )
            latents = latents - self.inner_lr * latent_gradient
        return latents

    def finetuning_inner_loop(self, tr_input, tr_onehot, class_weights, noise):
        """F steps of w <- w - finetuning_lr * dL_tr/dw on c `[B, N, D]`.

        Each w[n, k], hence c[n], moves by finetuning_lr * dL_tr/dc[n] / K.
        """
        num_shots = tf.cast(tf.shape(tr_input)[2], self.compute_dtype)
        first = self.config.inner_unroll_length
        for step in range(self.config.finetuning_unroll_length):
            dropout_mask = _pick(noise.support_dropout, first + step)
            gradient = self.support_loss_gradient(
                tr_input, tr_onehot, class_weights, dropout_mask
            )
            class_weights = class_weights - self.finetuning_lr * (gradient / num_shots)
        return class_weights

    def adapt(self, tr_input, tr_output, noise=_NO_NOISE):
        """Encodes, adapts in latent space, decodes and finetunes: an Adaptation.

        tr_input: [B, N, K, D]; tr_output: [B, N, K, 1] int labels; noise:
        EpisodeNoise (meta-training) or _NO_NOISE (evaluation).
        """
        tr_input = tf.cast(tr_input, self.compute_dtype)
        num_classes = tf.shape(tr_input)[1]
        tr_onehot = tf.one_hot(tr_output[..., 0], num_classes, dtype=self.compute_dtype)
        latent_distribution = self.encode(tr_input, noise.encoder_dropout)
        latents = gaussians.sample(latent_distribution, noise.latent)
        halves = self.decoder.kernel_halves()
        adapted = self.leo_inner_loop(tr_input, tr_onehot, latents, noise, halves)
        weight_noise = _pick(noise.weights, self.config.inner_unroll_length)
        class_weights = self.decode(adapted, weight_noise, halves)
        class_weights = self.finetuning_inner_loop(
            tr_input, tr_onehot, class_weights, noise
        )
        return Adaptation(latent_distribution, latents, adapted, class_weights)

    def run_episodes(self, episodes, noise=None):
        """EpisodeOutputs: per episode, query cross-entropy + beta KL + gamma penalty.

        episodes: tr_input [B, N, K, D], tr_output [B, N, K, 1] int, val_input
        [B, N, V, D], val_output [B, N, V, 1] int. noise: EpisodeNoise for
        meta-training, None for evaluation.
        """
        noise = noise or _NO_NOISE
        val_input = tf.cast(episodes.val_input, self.compute_dtype)
        adaptation = self.adapt(episodes.tr_input, episodes.tr_output, noise)
        logits = self.predict(val_input, adaptation.class_weights, noise.query_dropout)
        labels = episodes.val_output[..., 0]
        cross_entropy = ops.softmax_cross_entropy(labels, logits)
        query_loss = ops.mean_per_episode(cross_entropy)
        correct = tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels)
        accuracy = ops.mean_per_episode(tf.cast(correct, self.compute_dtype))
        kl, encoder_penalty = gaussians.latent_regularisers(adaptation, noise.latent)
        loss = (
            query_loss
            + self.config.kl_weight * kl
            + self.config.encoder_penalty_weight * encoder_penalty
        )
        return EpisodeOutputs(
            loss, query_loss, accuracy, kl, encoder_penalty, adaptation.latents, logits
        )

    def meta_batch_loss(self, episodes, noise=None):
        """MetaBatchLoss of a meta-batch (see `run_episodes`, `objective`)."""
        return self.objective(self.run_episodes(episodes, noise))

    def objective(self, outputs):
        """MetaBatchLoss: mean of EpisodeOutputs' losses `[B]` + weighted penalties."""
        l2, orthogonality, penalties = layers.weight_penalties(self)
        total = tf.reduce_mean(outputs.loss) + penalties
        return MetaBatchLoss(total, outputs, l2, orthogonality, penalties)

    def get_config(self):
        """The layer's config, with embedding_dim, seed and ModelConfig's fields."""
        return {
            **super().get_config(),
            "embedding_dim": self.embedding_dim,
            "seed": self.seed,
            **vars(self.config),
        }

    @classmethod
    def from_config(cls, config):
        """The model that `get_config()` describes, newly initialised."""
        config = dict(config)
        fields = {f.name: config.pop(f.name) for f in dataclasses.fields(ModelConfig)}
        return cls(ModelConfig(**fields), **config)
