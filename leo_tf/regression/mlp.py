"""The regressor of few-shot regression: a bias-ful ReLU MLP on scalars.

1 input, two hidden layers of H units (40, as in MAML), 1 output: three linear
layers. Its parameters travel as one flat vector per task, `[B, P]`, laid out
layer by layer as (kernel [I, O] row-major, then bias [O]), so that LEO's
decoder can generate them and both inner loops can update them as one tensor.
"""

import numpy as np
import tensorflow as tf


def layer_sizes(hidden_units):
    """[(inputs, outputs)] of the three layers: 1 -> H -> H -> 1."""
    return [(1, hidden_units), (hidden_units, hidden_units), (hidden_units, 1)]


def num_parameters(hidden_units):
    """P, the length of the flat parameter vector."""
    return sum(i * o + o for i, o in layer_sizes(hidden_units))


def unpack(parameters, hidden_units):
    """[B, P] -> [(kernel [B, I, O], bias [B, O])] per layer."""
    sizes = layer_sizes(hidden_units)
    pieces = tf.split(parameters, [n for i, o in sizes for n in (i * o, o)], axis=-1)
    return [
        (tf.reshape(kernel, [-1, i, o]), bias)
        for (i, o), kernel, bias in zip(sizes, pieces[::2], pieces[1::2])
    ]


def forward(parameters, inputs, hidden_units):
    """The regressors' outputs: parameters [B, P], inputs [B, M, 1] -> [B, M, 1]."""
    layers = unpack(parameters, hidden_units)
    hidden = inputs
    for index, (kernel, bias) in enumerate(layers):
        hidden = tf.matmul(hidden, kernel) + bias[:, None, :]
        if index < len(layers) - 1:
            hidden = tf.nn.relu(hidden)
    return hidden


def glorot_parameters(rng, hidden_units):
    """A flat [P] vector: Glorot-uniform kernels, zero biases (NumPy, float32)."""
    parts = []
    for inputs, outputs in layer_sizes(hidden_units):
        limit = np.sqrt(6.0 / (inputs + outputs))
        parts.append(rng.uniform(-limit, limit, size=inputs * outputs))
        parts.append(np.zeros(outputs))
    return np.concatenate(parts).astype(np.float32)
