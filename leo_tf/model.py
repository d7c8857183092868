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

`matmul`, the classifier's batched product, is `ops.per_episode_matmul` (the
default) or `tf.matmul`: equal values, in the form the caller's host runs best.
"""

import dataclasses
from typing import NamedTuple

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from leo_tf import layers, ops
from leo_tf.config import ModelConfig
from leo_tf.noise import EpisodeNoise

tfd = tfp.distributions

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

    latent_distribution: tfd.Normal  # over [B, N, K, L]
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
    return _mean_per_episode(log_q - log_prior)


def _mean_per_episode(values):
    """[B, ...] -> [B]."""
    return tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


def _pick(stack, index):
    """stack[index], or None where there is no noise (evaluation)."""
    return None if stack is None else stack[index]


class LEO(keras.layers.Layer):
    """The LEO model; see the module docstring for shapes and modes."""

    def __init__(
        self, config, embedding_dim, seed=None, dtype="float32", name="leo", **kwargs
    ):
        """config: ModelConfig; embedding_dim: D; seed: of the initialisers."""
        super().__init__(dtype=dtype, name=name, **kwargs)
        self.config, self.embedding_dim, self.seed = config, embedding_dim, seed
        latents = config.num_latents

        def offset(value):
            return None if seed is None else seed + value

        self.encoder = layers.Encoder(latents, seed=seed, dtype=dtype, name="encoder")
        self.relation_network = layers.RelationNetwork(
            seed=offset(1), dtype=dtype, name="relation_network"
        )
        self.decoder = layers.Decoder(
            embedding_dim, seed=offset(10), dtype=dtype, name="decoder"
        )
        self.encoder.build((None, None, None, embedding_dim))
        self.relation_network.build((None, None, None, latents))
        self.decoder.build((None, None, None, latents))
        self.inner_lr = self._rate("inner_lr", latents, config.inner_lr_init)
        self.finetuning_lr = self._rate(
            "finetuning_lr", embedding_dim, config.finetuning_lr_init
        )
        self.built = True

    def _rate(self, name, size, initial):
        """A trainable learning-rate vector [size], every element `initial`."""
        initializer = keras.initializers.Constant(initial)
        return self.add_weight(name=name, shape=(size,), initializer=initializer)

    @property
    def weight_matrices(self):
        """The kernels that the L2 penalty covers (not the learning rates)."""
        return layers.network_kernels(self.encoder, self.relation_network, self.decoder)

    # Encoding: the support set's distribution over latent codes.
    def encode(self, tr_input, dropout_mask=None):
        """tr_input: [B, N, K, D] -> Normal over latent codes [B, N, K, L]."""
        return gaussian(self.relation_network(self.encoder(tr_input, dropout_mask)))

    # Decoding: classifier weights from latent codes.
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
        scale = weight_stddev(pre_stddev, offset)  # [B, N, K, D]
        return class_loc + layers.mean_along(scale * standard_noise, axis=2)

    def predict(
        self, inputs, class_weights, dropout_mask=None, matmul=ops.per_episode_matmul
    ):
        """Logits <x, c[n]> `[B, G, M, N]` of inputs `[B, G, M, D]` (G groups of M).

        class_weights: [B, N, D]; dropout_mask: like inputs, or None.
        """
        inputs = layers.apply_dropout(inputs, dropout_mask)
        logits = matmul(ops.flatten_examples(inputs), class_weights, transpose_b=True)
        shape = tf.concat([tf.shape(inputs)[:3], tf.shape(class_weights)[1:2]], 0)
        return tf.reshape(logits, shape)

    def support_loss_gradient(
        self,
        tr_input,
        tr_onehot,
        class_weights,
        dropout_mask=None,
        matmul=ops.per_episode_matmul,
    ):
        """d/dc[n] of the SUM of the support cross-entropies: sum_x (p - y)_n x.

        tr_input, dropout_mask: [B, N, K, D]; tr_onehot: [B, N, K, N] labels;
        class_weights: [B, N, D] -> [B, N, D]. The authors' gradient w.r.t. each
        of the K weights w[n, k] is this / K. The outer tape differentiates
        through this closed form, so second-order gradients stay exact.
        """
        inputs = layers.apply_dropout(tr_input, dropout_mask)
        logits = self.predict(inputs, class_weights, matmul=matmul)
        residual = tf.nn.softmax(logits) - tr_onehot  # [B, N, K, N]
        flat = ops.flatten_examples
        return matmul(flat(residual), flat(inputs), transpose_a=True)

    # The inner loop: adaptation in latent space.
    def leo_inner_loop(
        self,
        tr_input,
        tr_onehot,
        latents,
        noise,
        decoder_halves=None,
        matmul=ops.per_episode_matmul,
    ):
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
                tr_input, tr_onehot, class_weights, dropout_mask, matmul=matmul
            )
            latent_gradient = tape.gradient(
                class_weights, latents, output_gradients=class_gradient
            )
            latents = latents - self.inner_lr * latent_gradient
        return latents

    # Finetuning: adaptation of the decoded weights in parameter space.
    def finetuning_inner_loop(
        self, tr_input, tr_onehot, class_weights, noise, matmul=ops.per_episode_matmul
    ):
        """F steps of w <- w - finetuning_lr * dL_tr/dw on c `[B, N, D]`.

        Each w[n, k], hence c[n], moves by finetuning_lr * dL_tr/dc[n] / K.
        """
        num_shots = tf.cast(tf.shape(tr_input)[2], self.compute_dtype)
        first = self.config.inner_unroll_length
        for step in range(self.config.finetuning_unroll_length):
            dropout_mask = _pick(noise.support_dropout, first + step)
            class_gradient = self.support_loss_gradient(
                tr_input, tr_onehot, class_weights, dropout_mask, matmul=matmul
            )
            class_weights = class_weights - self.finetuning_lr * (
                class_gradient / num_shots
            )
        return class_weights

    def adapt(
        self, tr_input, tr_output, noise=_NO_NOISE, matmul=ops.per_episode_matmul
    ):
        """Encodes, adapts in latent space, decodes and finetunes: an Adaptation.

        tr_input: [B, N, K, D]; tr_output: [B, N, K, 1] int labels; noise:
        EpisodeNoise (meta-training) or _NO_NOISE (evaluation).
        """
        tr_input = tf.cast(tr_input, self.compute_dtype)
        num_classes = tf.shape(tr_input)[1]
        tr_onehot = tf.one_hot(tr_output[..., 0], num_classes, dtype=self.compute_dtype)
        latent_distribution = self.encode(tr_input, noise.encoder_dropout)
        latents = sample(latent_distribution, noise.latent)
        halves = self.decoder.kernel_halves()
        adapted = self.leo_inner_loop(
            tr_input, tr_onehot, latents, noise, halves, matmul=matmul
        )
        weight_noise = _pick(noise.weights, self.config.inner_unroll_length)
        class_weights = self.decode(adapted, weight_noise, halves)
        class_weights = self.finetuning_inner_loop(
            tr_input, tr_onehot, class_weights, noise, matmul=matmul
        )
        return Adaptation(latent_distribution, latents, adapted, class_weights)

    # The losses: per episode, query cross-entropy + beta KL + gamma penalty.
    def run_episodes(self, episodes, noise=None, matmul=ops.per_episode_matmul):
        """EpisodeOutputs of adapting to each support set and scoring its queries.

        episodes: tr_input [B, N, K, D], tr_output [B, N, K, 1] int, val_input
        [B, N, V, D], val_output [B, N, V, 1] int. noise: EpisodeNoise for
        meta-training, None for evaluation.
        """
        training = noise is not None
        noise = noise or _NO_NOISE
        val_input = tf.cast(episodes.val_input, self.compute_dtype)
        adaptation = self.adapt(episodes.tr_input, episodes.tr_output, noise, matmul)
        logits = self.predict(
            val_input, adaptation.class_weights, noise.query_dropout, matmul
        )
        labels = episodes.val_output[..., 0]
        query_loss = _mean_per_episode(ops.softmax_cross_entropy(labels, logits))
        correct = tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels)
        accuracy = _mean_per_episode(tf.cast(correct, self.compute_dtype))
        latents = adaptation.latents
        if training:
            kl = kl_estimate(adaptation.latent_distribution, noise.latent, latents)
            adapted = tf.stop_gradient(adaptation.adapted_latents)
            encoder_penalty = _mean_per_episode(tf.square(latents - adapted))
        else:
            kl = encoder_penalty = tf.zeros_like(query_loss)
        config = self.config
        loss = (
            query_loss
            + config.kl_weight * kl
            + config.encoder_penalty_weight * encoder_penalty
        )
        return EpisodeOutputs(
            loss, query_loss, accuracy, kl, encoder_penalty, latents, logits
        )

    def l2_penalty(self):
        """Sum over the weight matrices of sum(w^2) / 2 (scalar)."""
        return tf.add_n([tf.nn.l2_loss(w) for w in self.weight_matrices])

    def meta_batch_loss(self, episodes, noise=None, matmul=ops.per_episode_matmul):
        """MetaBatchLoss of a meta-batch (see `run_episodes`, `objective`)."""
        return self.objective(self.run_episodes(episodes, noise, matmul))

    def objective(self, outputs):
        """MetaBatchLoss: mean of EpisodeOutputs' losses `[B]` + weighted penalties."""
        l2 = self.l2_penalty()
        orthogonality = self.decoder.orthogonality_penalty()
        penalties = (
            self.config.l2_penalty_weight * l2
            + self.config.orthogonality_penalty_weight * orthogonality
        )
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
