"""The baseline: MAML (Finn et al. 2017) on the same 1-H-H-1 regressor.

One learned initialisation of the regressor's flat parameters `[P]` (Glorot
kernels, zero biases), adapted to each task by a fixed number of plain
gradient steps with a fixed learning rate on the mean squared support error,
as in MAML's regression experiments, each task's gradient norm clipped as in
LEO's inner loops (`model.clip_per_task`). The outer loss is the mean squared query
error; the adaptation runs on nested GradientTapes, so the outer gradient is
second order (full MAML, not first-order MAML).
"""

import keras
import numpy as np
import tensorflow as tf

from leo_tf.regression import mlp
from leo_tf.regression.model import clip_per_task, mean_squared_error


class MAMLRegressor(keras.layers.Layer):
    """A learned initialisation adapted by `maml_inner_steps` gradient steps."""

    def __init__(self, config, seed=None, dtype="float32", name="maml", **kwargs):
        """config: RegressionConfig; seed: of the initialisation."""
        super().__init__(dtype=dtype, name=name, **kwargs)
        self.config = config
        initial = mlp.glorot_parameters(
            np.random.default_rng(seed), config.hidden_units
        )
        self.initial_parameters = self.add_weight(
            name="initial_parameters",
            shape=initial.shape,
            initializer=keras.initializers.Constant(initial),
        )
        self.built = True

    @property
    def weight_matrices(self):
        return [self.initial_parameters]

    def predict(self, parameters, inputs):
        """parameters [B, P], inputs [B, M, 1] -> [B, M, 1]."""
        return mlp.forward(parameters, inputs, self.config.hidden_units)

    def adapt(self, support_x, support_y):
        """Support points [B, K, 1] x2 -> adapted parameters [B, P]."""
        batch_size = tf.shape(support_x)[0]
        parameters = tf.tile(
            tf.convert_to_tensor(self.initial_parameters)[None], [batch_size, 1]
        )
        for _ in range(self.config.maml_inner_steps):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(parameters)
                loss = tf.reduce_sum(
                    mean_squared_error(self.predict(parameters, support_x), support_y)
                )
            gradient = clip_per_task(
                tape.gradient(loss, parameters),
                self.config.inner_gradient_norm_threshold,
            )
            parameters = parameters - self.config.maml_inner_lr * gradient
        return parameters

    def query_mse(self, batch):
        """Mean squared error of the adapted regressors on the queries [B]."""
        parameters = self.adapt(batch.support_x, batch.support_y)
        predictions = self.predict(parameters, batch.query_x)
        return mean_squared_error(predictions, batch.query_y)
