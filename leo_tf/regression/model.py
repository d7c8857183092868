"""LEO for few-shot regression: the latent code of a task generates its regressor.

The machinery is classification's (leo_tf.layers, leo_tf.gaussians), with one
"class" per task: every support pair (x, y) is encoded into a code, the
relation network relates all K codes of the task and averages them into one
Gaussian over the task's latent code z `[B, L]`; the decoder maps z to a
Gaussian over the flat parameters `[B, P]` of the 1-H-H-1 regressor (mlp.py).
Adaptation takes S steps on z (re-decoding, and in meta-training re-sampling,
the parameters each time), then F finetuning steps on the parameters, each
down the gradient of the mean squared error on the support set; both inner
loops run on nested GradientTapes, so the outer gradient is second order.

The likelihood is Gaussian, with a learned observation-noise stddev: the
query loss is its negative log-likelihood. As in classification, the KL term
and the encoder penalty enter the loss in meta-training only, and evaluation
takes the means of both Gaussians (z = mu, parameters = decoded mean).

Shapes: B tasks, K support points, M points to predict, L latent width,
P regressor parameters.
"""

from typing import NamedTuple

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from leo_tf import gaussians, layers
from leo_tf.regression import mlp, tasks

tfd = tfp.distributions

# The half-width of the tasks' input range, by which the encoder's inputs are
# divided (see `LEORegressor.encode`).
INPUT_SCALE = tasks.X_RANGE[1]


class Noise(NamedTuple):
    """Standard normal noise of one meta-training step (or sampled adaptation)."""

    latent: tf.Tensor  # [B, L]
    parameters: tf.Tensor  # [S + 1, B, P], one per decode


class Adaptation(NamedTuple):
    """What adapting to support sets produces."""

    latent_distribution: tfd.Normal  # over [B, L]
    latents: tf.Tensor  # [B, L] sampled (or mean) initial codes
    adapted_latents: tf.Tensor  # [B, L] after the latent steps
    parameters: tf.Tensor  # [B, P] after finetuning


class TaskLosses(NamedTuple):
    """Per-task results of one forward pass, each [B]."""

    loss: tf.Tensor  # query NLL + kl_weight KL + encoder_penalty_weight penalty
    query_nll: tf.Tensor  # mean Gaussian NLL of the query observations
    query_mse: tf.Tensor  # mean squared error against the query observations
    kl: tf.Tensor  # single-sample KL estimate (0 in evaluation)
    encoder_penalty: tf.Tensor  # mean (z - stop_gradient(z'))^2 (0 in evaluation)


def noise_shapes(config, batch_size):
    """Noise of shapes (lists of ints) for B tasks."""
    return Noise(
        latent=[batch_size, config.num_latents],
        parameters=[
            config.inner_unroll_length + 1,
            batch_size,
            mlp.num_parameters(config.hidden_units),
        ],
    )


def draw_noise(config, batch_size, seed, dtype=tf.float32):
    """Noise from a stateless seed (a [2] int tensor): the same seed, the same noise."""
    shapes = noise_shapes(config, batch_size)
    seeds = tf.random.experimental.stateless_split(seed, num=2)  # [2, 2]
    return Noise(
        *(
            tf.random.stateless_normal(shape, seeds[i], dtype=dtype)
            for i, shape in enumerate(shapes)
        )
    )


def _pick(stack, index):
    return None if stack is None else stack[index]


def mean_squared_error(predictions, targets):
    """mean_k (f(x_k) - y_k)^2 per task: [B, K, 1] x2 -> [B]."""
    return tf.reduce_mean(tf.square(predictions - targets), axis=[1, 2])


def clip_per_task(gradient, threshold):
    """Each task's inner-loop gradient `[B, X]`, its norm clipped to threshold.

    A deep regressor's squared error is a high-degree function of its
    parameters (and of LEO's code): unclipped, one step on a steep task can
    overshoot to an infinite loss, and leave the whole meta-batch without a
    gradient. threshold 0 leaves the gradient as it is.
    """
    return tf.clip_by_norm(gradient, threshold, axes=[1]) if threshold else gradient


class LEORegressor(keras.layers.Layer):
    """LEO generating the parameters of a 1-H-H-1 regressor from a latent code."""

    def __init__(self, config, seed=None, dtype="float32", name="leo", **kwargs):
        """config: RegressionConfig; seed: of the initialisers."""
        super().__init__(dtype=dtype, name=name, **kwargs)
        self.config = config
        self.num_parameters = mlp.num_parameters(config.hidden_units)
        self.encoder, self.relation_network, self.decoder = layers.networks(
            2, config.num_latents, self.num_parameters, seed, dtype
        )
        self.inner_lr = layers.add_rate(
            self, "inner_lr", config.num_latents, config.inner_lr_init
        )
        self.finetuning_lr = layers.add_rate(
            self, "finetuning_lr", self.num_parameters, config.finetuning_lr_init
        )
        self.log_noise_stddev = self.add_weight(
            name="log_noise_stddev", shape=(), initializer="zeros"
        )
        self.built = True

    @property
    def weight_matrices(self):
        """The kernels that the L2 penalty covers (not the learning rates)."""
        return layers.network_kernels(self.encoder, self.relation_network, self.decoder)

    def noise_stddev(self):
        """The learned stddev of the observation noise (scalar)."""
        return tf.exp(self.log_noise_stddev)

    def encode(self, support_x, support_y):
        """Support points [B, K, 1] x2 -> Normal over the task's code [B, L].

        The K pairs are one class of K shots for the encoder and the relation
        network, whose class average is the same for every shot. The pairs are
        divided by INPUT_SCALE, so that the Glorot-initialised codes, and the
        exp of their stddev half, start near unit scale.
        """
        pairs = tf.concat([support_x, support_y], axis=-1)[:, None] / INPUT_SCALE
        related = self.relation_network(self.encoder(pairs))  # [B, 1, K, 2L]
        return gaussians.gaussian(related[:, 0, 0])

    def decode(self, latents, standard_noise=None):
        """Codes [B, L] -> regressor parameters [B, P].

        Gaussian with loc z W_mu and scale max(exp(z W_u) - 1, 1e-10): sampled
        loc + scale * noise in meta-training, the loc without noise.
        """
        loc = self.decoder.loc(latents)
        if standard_noise is None:
            return loc
        scale = gaussians.latent_stddev(self.decoder.pre_stddev(latents))
        return loc + scale * standard_noise

    def predict(self, parameters, inputs):
        """parameters [B, P], inputs [B, M, 1] -> predicted means [B, M, 1]."""
        return mlp.forward(parameters, inputs, self.config.hidden_units)

    def support_loss(self, parameters, support_x, support_y):
        """The inner loops' objective: mean squared support error [B]."""
        return mean_squared_error(self.predict(parameters, support_x), support_y)

    def leo_inner_loop(self, support_x, support_y, latents, parameter_noise):
        """S steps of z <- z - inner_lr * dL_support/dz (clipped); returns [B, L]."""
        for step in range(self.config.inner_unroll_length):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(latents)
                parameters = self.decode(latents, _pick(parameter_noise, step))
                loss = tf.reduce_sum(
                    self.support_loss(parameters, support_x, support_y)
                )
            gradient = clip_per_task(
                tape.gradient(loss, latents), self.config.inner_gradient_norm_threshold
            )
            latents = latents - self.inner_lr * gradient
        return latents

    def finetuning_inner_loop(self, support_x, support_y, parameters):
        """F steps of w <- w - finetuning_lr * dL_support/dw (clipped); [B, P]."""
        for _ in range(self.config.finetuning_unroll_length):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(parameters)
                loss = tf.reduce_sum(
                    self.support_loss(parameters, support_x, support_y)
                )
            gradient = clip_per_task(
                tape.gradient(loss, parameters),
                self.config.inner_gradient_norm_threshold,
            )
            parameters = parameters - self.finetuning_lr * gradient
        return parameters

    def adapt(self, support_x, support_y, noise=None):
        """Encodes, adapts in latent space, decodes, then finetunes.

        Args:
          support_x, support_y: [B, K, 1].
          noise: Noise (meta-training, sampled adaptations) or None (means).

        Returns:
          Adaptation.
        """
        latent_noise = None if noise is None else noise.latent
        parameter_noise = None if noise is None else noise.parameters
        distribution = self.encode(support_x, support_y)
        latents = gaussians.sample(distribution, latent_noise)
        adapted = self.leo_inner_loop(support_x, support_y, latents, parameter_noise)
        parameters = self.decode(
            adapted, _pick(parameter_noise, self.config.inner_unroll_length)
        )
        parameters = self.finetuning_inner_loop(support_x, support_y, parameters)
        return Adaptation(distribution, latents, adapted, parameters)

    def task_losses(self, batch, noise=None):
        """Adapts to each task's support set and scores its queries.

        Args:
          batch: tasks.Batch of tensors.
          noise: Noise for meta-training; None for evaluation.

        Returns:
          TaskLosses.
        """
        adaptation = self.adapt(batch.support_x, batch.support_y, noise)
        predictions = self.predict(adaptation.parameters, batch.query_x)
        likelihood = tfd.Normal(loc=predictions, scale=self.noise_stddev())
        query_nll = -tf.reduce_mean(likelihood.log_prob(batch.query_y), axis=[1, 2])
        query_mse = mean_squared_error(predictions, batch.query_y)
        latent_noise = None if noise is None else noise.latent
        kl, encoder_penalty = gaussians.latent_regularisers(adaptation, latent_noise)
        loss = (
            query_nll
            + self.config.kl_weight * kl
            + self.config.encoder_penalty_weight * encoder_penalty
        )
        return TaskLosses(loss, query_nll, query_mse, kl, encoder_penalty)

    def meta_loss(self, batch, noise):
        """(scalar objective, TaskLosses): mean task loss plus the weight penalties."""
        losses = self.task_losses(batch, noise)
        penalties = layers.weight_penalties(self)[2]
        return tf.reduce_mean(losses.loss) + penalties, losses

    def sampled_predictions(self, support_x, support_y, inputs, noises):
        """Predictions of independently sampled adaptations.

        Args:
          support_x, support_y: [B, K, 1].
          inputs: [B, M, 1].
          noises: Noise for S * B tasks (S samples of each task, sample-major).

        Returns:
          [S, B, M, 1].
        """
        num_samples = tf.shape(noises.latent)[0] // tf.shape(support_x)[0]

        def tiled(values):
            return tf.tile(values, [num_samples, 1, 1])

        adaptation = self.adapt(tiled(support_x), tiled(support_y), noises)
        predictions = self.predict(adaptation.parameters, tiled(inputs))
        return tf.reshape(
            predictions, tf.concat([[num_samples], tf.shape(inputs)], axis=0)
        )

    def predictive_nll(self, samples, targets):
        """-log of the equal mixture of N(f_s(x), sigma^2) at y, mean per task.

        samples: [S, B, M, 1] sampled predictions; targets: [B, M, 1] -> [B].
        """
        components = tf.transpose(samples[..., 0], [1, 2, 0])  # [B, M, S]
        mixture = tfd.MixtureSameFamily(
            mixture_distribution=tfd.Categorical(logits=tf.zeros_like(components)),
            components_distribution=tfd.Normal(
                loc=components, scale=self.noise_stddev()
            ),
        )
        return -tf.reduce_mean(mixture.log_prob(targets[..., 0]), axis=1)
