"""The Keras layers against independent NumPy computations."""

import types

import numpy as np
import pytest
import tensorflow as tf

from leo_tf import layers


def _relu(x):
    return np.maximum(x, 0.0)


def test_encoder_is_dropout_then_bias_free_linear_map():
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(2, 3, 2, 5))
    mask = rng.choice([0.0, 2.0], size=inputs.shape)
    encoder = layers.Encoder(4, seed=1, dtype="float64")
    encoder.build(inputs.shape)
    kernel = encoder.kernel.numpy()

    outputs = encoder(inputs, mask).numpy()

    np.testing.assert_allclose(outputs, (inputs * mask) @ kernel, rtol=1e-12)
    np.testing.assert_allclose(encoder(inputs).numpy(), inputs @ kernel, rtol=1e-12)
    assert len(encoder.trainable_variables) == 1  # no bias


def test_encoder_kernel_is_glorot_uniform():
    encoder = layers.Encoder(64, seed=3)
    encoder.build((None, None, None, 640))
    kernel = encoder.kernel.numpy()
    limit = np.sqrt(6.0 / (640 + 64))
    assert np.abs(kernel).max() <= limit
    # Uniform on [-limit, limit] has variance limit^2 / 3.
    np.testing.assert_allclose(kernel.var(), limit**2 / 3, rtol=0.05)


def _relation_network_numpy(codes, kernels):
    """Explicit (NK)^2 concatenated pairs, as in the authors' code."""
    batch, classes, shots, _ = codes.shape
    outputs = []
    for b in range(batch):
        flat = codes[b].reshape(classes * shots, -1)
        total = flat.shape[0]
        pairs = np.array(
            [
                [np.concatenate([flat[i], flat[j]]) for j in range(total)]
                for i in range(total)
            ]
        )
        hidden = pairs
        for depth, kernel in enumerate(kernels):
            hidden = hidden @ kernel
            if depth < len(kernels) - 1:
                hidden = _relu(hidden)
        per_example = hidden.mean(axis=1).reshape(classes, shots, -1)
        class_mean = per_example.mean(axis=1, keepdims=True)
        outputs.append(np.broadcast_to(class_mean, per_example.shape))
    return np.stack(outputs)


def _relation_network(codes):
    """A float64 RelationNetwork built for codes, and its kernels in NumPy."""
    network = layers.RelationNetwork(seed=5, dtype="float64")
    network.build(codes.shape)
    return network, [k.numpy() for k in network.kernels]


def test_relation_network_matches_explicit_pairs():
    codes = np.random.default_rng(1).normal(size=(2, 3, 2, 4))
    network, kernels = _relation_network(codes)

    outputs = network(codes).numpy()

    assert outputs.shape == (2, 3, 2, 8)
    np.testing.assert_allclose(
        outputs, _relation_network_numpy(codes, kernels), rtol=1e-10, atol=1e-12
    )
    # The K shots of a class share their averaged parameters.
    np.testing.assert_array_equal(outputs[:, :, 0], outputs[:, :, 1])


def test_relation_network_pair_order_matters():
    """Swapping (i, j) in the pairs changes the result: the test above binds."""
    codes = np.random.default_rng(2).normal(size=(1, 3, 2, 4))
    network, kernels = _relation_network(codes)
    swapped_first = np.concatenate([kernels[0][4:], kernels[0][:4]])
    swapped = _relation_network_numpy(codes, [swapped_first, *kernels[1:]])
    assert np.abs(network(codes).numpy() - swapped).max() > 1e-3


def test_decoder_is_bias_free_linear_map_to_twice_the_embedding_width():
    rng = np.random.default_rng(3)
    latents = rng.normal(size=(2, 3, 1, 4))
    decoder = layers.Decoder(6, seed=2, dtype="float64")
    decoder.build(latents.shape)
    kernel = decoder.kernel.numpy()
    assert kernel.shape == (4, 12)
    np.testing.assert_allclose(decoder(latents).numpy(), latents @ kernel, rtol=1e-12)
    # Its halves on their own: the weights' mean, then their stddev's input.
    np.testing.assert_allclose(
        decoder.loc(latents).numpy(), latents @ kernel[:, :6], rtol=1e-12
    )
    np.testing.assert_allclose(
        decoder.pre_stddev(latents).numpy(), latents @ kernel[:, 6:], rtol=1e-12
    )


def test_orthogonality_penalty_matches_numpy():
    rng = np.random.default_rng(4)
    kernel = rng.normal(size=(4, 10))
    norms = np.linalg.norm(kernel, axis=1, keepdims=True)
    cosine = (kernel @ kernel.T) / (norms @ norms.T)
    expected = np.mean((cosine - np.eye(4)) ** 2)

    penalty = layers.orthogonality_penalty(tf.constant(kernel)).numpy()

    np.testing.assert_allclose(penalty, expected, rtol=1e-12)


def test_orthogonality_penalty_is_zero_for_orthogonal_rows_and_known_value():
    orthogonal = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, -3.0]])
    assert layers.orthogonality_penalty(orthogonal).numpy() == pytest.approx(0)
    # Two identical rows: C = [[1, 1], [1, 1]], (C - I)^2 has two ones in four.
    identical = np.array([[1.0, 2.0], [1.0, 2.0]])
    assert layers.orthogonality_penalty(identical).numpy() == pytest.approx(0.5)


def test_networks_are_built_and_seeded_as_the_layers_alone():
    encoder, relation_network, decoder = layers.networks(5, 3, 4, seed=7)
    alone = [
        layers.Encoder(3, seed=7),
        layers.RelationNetwork(seed=8),
        layers.Decoder(4, seed=17),
    ]
    for layer, width in zip(alone, (5, 3, 3)):
        layer.build((None, width))
    built = [encoder.kernel, *relation_network.kernels, decoder.kernel]
    expected = [alone[0].kernel, *alone[1].kernels, alone[2].kernel]
    assert [k.shape for k in built] == [(5, 3), (6, 6), (6, 6), (6, 6), (3, 8)]
    for kernel, same in zip(built, expected):
        np.testing.assert_array_equal(kernel.numpy(), same.numpy())


def test_weight_penalties_are_the_halved_squares_and_the_orthogonality():
    encoder, relation_network, decoder = layers.networks(5, 3, 4, seed=1)
    model = types.SimpleNamespace(
        weight_matrices=[encoder.kernel, *relation_network.kernels, decoder.kernel],
        decoder=decoder,
        config=types.SimpleNamespace(
            l2_penalty_weight=0.5, orthogonality_penalty_weight=3.0
        ),
    )
    squares = sum((w.numpy() ** 2).sum() / 2 for w in model.weight_matrices)
    kernel = decoder.kernel.numpy()
    norms = np.linalg.norm(kernel, axis=1, keepdims=True)
    orthogonality = np.mean(((kernel @ kernel.T) / (norms @ norms.T) - np.eye(3)) ** 2)

    l2, ortho, weighted = (x.numpy() for x in layers.weight_penalties(model))

    np.testing.assert_allclose(l2, squares, rtol=1e-6)
    np.testing.assert_allclose(ortho, orthogonality, rtol=1e-5)
    np.testing.assert_allclose(weighted, 0.5 * l2 + 3.0 * ortho, rtol=1e-6)


@pytest.mark.parametrize(
    "layer",
    [
        layers.Encoder(7, seed=1),
        layers.RelationNetwork(num_layers=3, seed=2),
        layers.Decoder(11, seed=3),
    ],
)
def test_layer_config_round_trips(layer):
    rebuilt = type(layer).from_config(layer.get_config())
    assert rebuilt.get_config() == layer.get_config()


@pytest.mark.parametrize("keepdims", [False, True])
def test_mean_along_equals_the_mean_and_its_gradient_spreads_evenly(keepdims):
    values = tf.constant(np.random.default_rng(3).normal(size=(2, 3, 5, 4)))
    upstream = np.random.default_rng(4).normal(
        size=(2, 3, 1, 4) if keepdims else (2, 3, 4)
    )
    with tf.GradientTape() as tape:
        tape.watch(values)
        mean = layers.mean_along(values, axis=2, keepdims=keepdims)
    gradient = tape.gradient(mean, values, output_gradients=tf.constant(upstream))
    np.testing.assert_allclose(
        mean.numpy(), np.mean(values.numpy(), axis=2, keepdims=keepdims), rtol=1e-14
    )
    spread = np.broadcast_to(upstream.reshape(2, 3, 1, 4) / 5, (2, 3, 5, 4))
    np.testing.assert_allclose(gradient.numpy(), spread, rtol=1e-14)
