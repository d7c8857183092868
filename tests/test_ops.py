"""The kernels under LEO's equations against NumPy, on any host."""

import numpy as np
import pytest
import tensorflow as tf

from leo_tf import ops


def test_floored_is_the_stddev_with_a_floor_of_1e_10():
    stddev = np.array([0.5, 1e-10, 1e-12, 0.0, -3.0, 2e-10])
    expected = np.maximum(stddev, 1e-10)
    np.testing.assert_allclose(
        ops.floored(tf.constant(stddev)).numpy(), expected, rtol=1e-15
    )


def test_softmax_cross_entropy_matches_numpy_and_is_stable():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 3, 4, 5)) * 3
    logits[0, 0, 0] += 1e4  # large logits must not overflow
    labels = rng.integers(0, 5, size=(2, 3, 4))
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    expected = -np.take_along_axis(log_softmax, labels[..., None], -1)[..., 0]
    for dtype, rtol in ((tf.float64, 1e-12), (tf.float32, 1e-5)):
        actual = ops.softmax_cross_entropy(
            tf.constant(labels, tf.int32), tf.constant(logits, dtype)
        ).numpy()
        assert np.all(np.isfinite(actual))
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-5)


def test_flatten_examples_merges_the_groups_and_their_examples():
    values = np.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(
        ops.flatten_examples(tf.constant(values)).numpy(), values.reshape(2, 12, 5)
    )


@pytest.mark.parametrize("transpose_a,transpose_b", [(False, True), (True, False)])
def test_per_episode_matmul_is_the_batched_product(transpose_a, transpose_b):
    rng = np.random.default_rng(4)
    a = rng.normal(size=(3, 7, 5) if not transpose_a else (3, 5, 7))
    b = rng.normal(size=(3, 6, 5) if transpose_b else (3, 5, 6))
    expected = np.matmul(
        np.swapaxes(a, 1, 2) if transpose_a else a,
        np.swapaxes(b, 1, 2) if transpose_b else b,
    )

    known = ops.per_episode_matmul(
        tf.constant(a), tf.constant(b), transpose_a, transpose_b
    )
    unknown_batch = tf.function(
        lambda x, y: ops.per_episode_matmul(x, y, transpose_a, transpose_b),
        input_signature=[tf.TensorSpec([None, None, None], tf.float64)] * 2,
    )(tf.constant(a), tf.constant(b))

    np.testing.assert_allclose(known.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(unknown_batch.numpy(), expected, rtol=1e-12)


def _matmul_rows(function, *specs):
    graph = tf.function(function).get_concrete_function(*specs).graph
    return sorted(
        op.inputs[0].shape[0] for op in graph.get_operations() if op.type == "MatMul"
    )


def test_query_logits_of_many_rows_are_row_blocked_and_exact():
    # V=599 evaluation shapes: 5 x 599 = 2995 query rows per episode are
    # three MatMuls of at most 1024 rows, whose concatenation is the product.
    rng = np.random.default_rng(2)
    inputs = rng.normal(size=(2, 2995, 8))
    class_weights = rng.normal(size=(2, 5, 8))

    def logits(x, c):
        return ops.per_episode_matmul(x, c, transpose_b=True)

    rows = _matmul_rows(
        logits,
        tf.TensorSpec(inputs.shape, tf.float64),
        tf.TensorSpec(class_weights.shape, tf.float64),
    )
    assert rows == [998, 998, 998, 998, 999, 999]
    np.testing.assert_allclose(
        logits(tf.constant(inputs), tf.constant(class_weights)).numpy(),
        np.einsum("bvd,bcd->bvc", inputs, class_weights),
        rtol=1e-12,
    )


def test_row_blocked_matmul_keeps_up_to_1024_rows_or_a_transposed_a_whole():
    def spec(*shape):
        return tf.TensorSpec(shape, tf.float64)

    def product(transpose_a):
        return lambda a, b: ops.row_blocked_matmul(a, b, transpose_a=transpose_a)

    assert _matmul_rows(product(False), spec(1024, 8), spec(8, 5)) == [1024]
    assert _matmul_rows(product(False), spec(1025, 8), spec(8, 5)) == [512, 513]
    assert _matmul_rows(product(True), spec(8, 3000), spec(8, 5)) == [8]
