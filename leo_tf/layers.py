"""Keras layers of LEO: the encoder, the relation network, the decoder, their penalties.

Every linear map is bias-free and Glorot-uniform initialised, as in the
authors' code. Shapes use B episodes, N classes, K examples per class,
D embedding width and L latent width.
"""

import keras
import tensorflow as tf


def _glorot(seed):
    return keras.initializers.GlorotUniform(seed=seed)


def _linear(inputs, kernel):
    """Applies a bias-free linear map `[..., I] x [I, O] -> [..., O]`.

    Written as one 2-D matmul on the flattened leading axes: TensorFlow's
    gradient of the equivalent `einsum("...i,io->...o")` is ~50x slower on CPU.
    """
    leading = tf.shape(inputs)[:-1]
    flat = tf.reshape(inputs, [-1, kernel.shape[0]])
    outputs = tf.matmul(flat, kernel)
    return tf.reshape(outputs, tf.concat([leading, [kernel.shape[-1]]], axis=0))


def mean_along(values, axis, keepdims=False):
    """tf.reduce_mean(values, axis), written as the sum over axis / its size.

    The same value; but its gradient divides the summed-over gradient by the
    size before broadcasting it back, where tf.reduce_mean's gradient divides
    the broadcast full-size tensor: one pass less over e.g. the relation
    network's `[B, NK, NK, 2L]` pairs, or the `[B, N, K, D]` weight samples in
    every decode and in each order of differentiation through it.
    """
    size = tf.cast(tf.shape(values)[axis], values.dtype)
    return tf.reduce_sum(values, axis=axis, keepdims=keepdims) / size


class _BiasFreeLinear(keras.layers.Layer):
    """A layer whose one weight is a Glorot-uniform kernel `[input width, units]`."""

    def __init__(self, units, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.seed = seed

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_shape[-1], self.units),
            initializer=_glorot(self.seed),
        )


class Encoder(_BiasFreeLinear):
    """Dropout, then a bias-free linear map from embeddings to latent codes.

    `[B, N, K, D] -> [B, N, K, L]`. Dropout is applied with a pre-drawn, scaled
    keep mask (0 or 1 / (1 - rate)) so that the random numbers come from the
    input pipeline; no mask means no dropout (evaluation).
    """

    def __init__(self, num_latents, seed=None, **kwargs):
        super().__init__(num_latents, seed, **kwargs)
        self.num_latents = num_latents

    def call(self, inputs, dropout_mask=None):
        """inputs, dropout_mask: [B, N, K, D] -> codes [B, N, K, L]."""
        return _linear(apply_dropout(inputs, dropout_mask), self.kernel)

    def get_config(self):
        return {
            **super().get_config(),
            "num_latents": self.num_latents,
            "seed": self.seed,
        }


class RelationNetwork(keras.layers.Layer):
    """Relates every code to every other code of the episode, then averages.

    `[B, N, K, L] -> [B, N, K, 2L]`: for all (NK)^2 ordered pairs (i, j) of the
    episode's codes, a 3-layer bias-free MLP of width 2L (ReLU between layers,
    none after the last) maps concat(code_i, code_j) to 2L outputs; these are
    averaged over the partners j, then over the K examples of each class, and
    the class average is broadcast back to the K examples.

    Two exact rewrites keep this cheap without changing the result:
    * concat(a, b) @ W1 = a @ W1[:L] + b @ W1[L:], so the first layer runs on the
      NK codes instead of the (NK)^2 concatenated pairs;
    * mean_j(h_ij @ W3) = (mean_j h_ij) @ W3, since the last layer is linear, so
      the last layer runs after averaging over partners.
    """

    def __init__(self, num_layers=3, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.seed = seed

    def build(self, input_shape):
        width = 2 * input_shape[-1]
        # One attribute per kernel: TensorFlow checkpoints track attributes,
        # not the elements of a plain Python list.
        for i in range(self.num_layers):
            seed = None if self.seed is None else self.seed + i
            setattr(
                self,
                f"kernel_{i}",
                self.add_weight(
                    name=f"kernel_{i}",
                    shape=(width, width),
                    initializer=_glorot(seed),
                ),
            )

    @property
    def kernels(self):
        """The MLP's kernels, first to last, each [2L, 2L]."""
        return [getattr(self, f"kernel_{i}") for i in range(self.num_layers)]

    def call(self, codes):
        """codes: [B, N, K, L] -> class-averaged relation outputs [B, N, K, 2L]."""
        shape = tf.shape(codes)
        batch, num_classes, num_shots = shape[0], shape[1], shape[2]
        num_latents = codes.shape[-1]
        flat = tf.reshape(codes, [batch, num_classes * num_shots, num_latents])
        first = self.kernels[0]
        own = _linear(flat, first[:num_latents])  # [B, NK, 2L], code_i part
        partner = _linear(flat, first[num_latents:])  # [B, NK, 2L], code_j part
        hidden = tf.nn.relu(own[:, :, None, :] + partner[:, None, :, :])
        for kernel in self.kernels[1:-1]:
            hidden = tf.nn.relu(_linear(hidden, kernel))  # [B, NK(i), NK(j), 2L]
        related = _linear(mean_along(hidden, axis=2), self.kernels[-1])
        related = tf.reshape(related, [batch, num_classes, num_shots, -1])
        class_mean = mean_along(related, axis=2, keepdims=True)
        return tf.broadcast_to(class_mean, tf.shape(related))

    def get_config(self):
        return {
            **super().get_config(),
            "num_layers": self.num_layers,
            "seed": self.seed,
        }


class Decoder(_BiasFreeLinear):
    """Bias-free linear map from latent codes to classifier-weight parameters.

    `[B, N, K, L] -> [B, N, K, 2D]`: the first D outputs are the mean of the
    classifier weights, the last D the pre-activation of their stddev. The two
    halves of the kernel, `[L, D]` each, can also be applied on their own
    (`loc`, `pre_stddev`), e.g. to different latents.
    """

    def __init__(self, embedding_dim, seed=None, **kwargs):
        super().__init__(2 * embedding_dim, seed, **kwargs)
        self.embedding_dim = embedding_dim

    def call(self, latents):
        """latents: [B, N, K, L] -> weight distribution parameters [B, N, K, 2D]."""
        return _linear(latents, self.kernel)

    def kernel_halves(self):
        """(W_mu, W_u), the kernel's `[L, D]` halves, split by one op.

        Reusing one split across the decodes of a step keeps the kernel's
        gradient one concat instead of a padded slice gradient per decode.
        """
        return tuple(tf.split(self.kernel, 2, axis=1))

    def loc(self, latents, kernel_halves=None):
        """latents: [..., L] -> mean of the classifier weights [..., D].

        kernel_halves: `kernel_halves()` to reuse, or None to split here.
        """
        return _linear(latents, (kernel_halves or self.kernel_halves())[0])

    def pre_stddev(self, latents, kernel_halves=None):
        """latents: [..., L] -> pre-activation of the weights' stddev [..., D].

        kernel_halves: `kernel_halves()` to reuse, or None to split here.
        """
        return _linear(latents, (kernel_halves or self.kernel_halves())[1])

    def orthogonality_penalty(self):
        """Mean squared distance of the kernel rows' cosine matrix from I."""
        return orthogonality_penalty(self.kernel)

    def get_config(self):
        return {
            **super().get_config(),
            "embedding_dim": self.embedding_dim,
            "seed": self.seed,
        }


def orthogonality_penalty(kernel):
    """mean((C - I)^2), C the cosine-similarity matrix of the kernel's rows.

    kernel: [L, 2D] (the decoder kernel); C: [L, L]. As in the authors' code a
    tiny epsilon is added to the row norms before dividing.
    """
    kernel = tf.convert_to_tensor(kernel)
    norms = tf.norm(kernel, axis=1, keepdims=True) + 1e-32  # [L, 1]
    cosine = tf.matmul(kernel, kernel, transpose_b=True) / tf.matmul(
        norms, norms, transpose_b=True
    )
    identity = tf.eye(tf.shape(kernel)[0], dtype=kernel.dtype)
    return tf.reduce_mean(tf.square(cosine - identity))


def networks(input_width, num_latents, output_width, seed=None, dtype=None):
    """LEO's encoder, relation network and decoder, built, in that order.

    Inputs `[..., input_width]` -> codes `[..., num_latents]` -> parameters
    `[..., 2 * output_width]` of a Gaussian; kernel seeds seed, seed + 1 (+ i
    for the relation network's i-th) and seed + 10, or None.
    """

    def offset(value):
        return None if seed is None else seed + value

    encoder = Encoder(num_latents, seed=seed, dtype=dtype, name="encoder")
    relation_network = RelationNetwork(
        seed=offset(1), dtype=dtype, name="relation_network"
    )
    decoder = Decoder(output_width, seed=offset(10), dtype=dtype, name="decoder")
    encoder.build((None, None, None, input_width))
    relation_network.build((None, None, None, num_latents))
    decoder.build((None, None, None, num_latents))
    return encoder, relation_network, decoder


def add_rate(layer, name, size, initial):
    """A trainable learning-rate vector `[size]` of `layer`, every element `initial`."""
    initializer = keras.initializers.Constant(initial)
    return layer.add_weight(name=name, shape=(size,), initializer=initializer)


def network_kernels(encoder, relation_network, decoder):
    """The kernels of LEO's encoder, relation network and decoder, in that
    order: the weight matrices its L2 penalty covers (no biases, no rates)."""
    return [encoder.kernel, *relation_network.kernels, decoder.kernel]


def weight_penalties(model):
    """(l2, orthogonality, their weighted sum), scalars, of a LEO model's networks.

    l2: sum over `model.weight_matrices` of sum(w^2) / 2; orthogonality: of
    `model.decoder`; weights: `model.config`'s l2_penalty_weight and
    orthogonality_penalty_weight.
    """
    l2 = tf.add_n([tf.nn.l2_loss(w) for w in model.weight_matrices])
    orthogonality = model.decoder.orthogonality_penalty()
    config = model.config
    weighted = (
        config.l2_penalty_weight * l2
        + config.orthogonality_penalty_weight * orthogonality
    )
    return l2, orthogonality, weighted


def apply_dropout(inputs, dropout_mask):
    """inputs * mask, mask a pre-drawn scaled keep mask; None: no dropout."""
    return inputs if dropout_mask is None else inputs * dropout_mask
