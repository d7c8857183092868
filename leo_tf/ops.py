"""Tensor kernels under LEO's equations, each written in the form that runs best.

Each function computes a textbook quantity (stated first in its docstring);
the form it is written in was chosen by measurement (BUILD.md, Performance).
Shapes use B episodes, N classes and D the embedding width.
"""

import tensorflow as tf

MIN_STDDEV = 1e-10
MAX_BLOCK_ROWS = 1024


def floored(stddev):
    """max(stddev, 1e-10), elementwise, as relu(stddev - 1e-10) + 1e-10.

    Equal up to one rounding; the gradient of relu is one ReluGrad op, where
    that of tf.maximum is a comparison and two selects.
    """
    return tf.nn.relu(stddev - MIN_STDDEV) + MIN_STDDEV


def softmax_cross_entropy(labels, logits):
    """Softmax cross-entropy `[...]` of int labels `[...]` and logits `[..., N]`.

    log sum_n exp(s_n) - s_label with s = logits - max_n logits, the value of
    tf.nn.sparse_softmax_cross_entropy_with_logits (the shift cancels, so it
    is held constant for the gradient), whose CPU kernel is slower on few
    classes.
    """
    shifted = logits - tf.stop_gradient(tf.reduce_max(logits, -1, keepdims=True))
    label_logits = tf.gather(shifted, labels, batch_dims=len(labels.shape))
    return tf.math.log(tf.reduce_sum(tf.exp(shifted), axis=-1)) - label_logits


def flatten_examples(values):
    """[B, N, M, X] -> [B, N * M, X]."""
    shape = tf.shape(values)
    return tf.reshape(values, [shape[0], shape[1] * shape[2], shape[3]])


def mean_per_episode(values):
    """The mean of each episode's values: [B, ...] -> [B]."""
    return tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


def per_episode_matmul(a, b, transpose_a=False, transpose_b=False):
    """tf.matmul of [B, ...] operands as one row-blocked 2-D product per episode.

    The same product as the batched `tf.matmul(a, b, ...)`, which is the
    better form on GPUs; on CPUs separate 2-D MatMuls are faster for LEO's
    few-column (N classes) products and run side by side on the inter-op
    threads. A batch of unknown size (serving) gets the batched matmul.
    """
    if a.shape[0] is None:
        return tf.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    return tf.stack(
        [
            row_blocked_matmul(x, y, transpose_a, transpose_b)
            for x, y in zip(tf.unstack(a), tf.unstack(b))
        ]
    )


def row_blocked_matmul(a, b, transpose_a=False, transpose_b=False):
    """tf.matmul of 2-D operands, a [R, X] cut into blocks of at most 1024 rows.

    The rows of a product are independent, (A B)[rows] = A[rows] B, so
    R > 1024 rows are cut into ceil(R / 1024) blocks of near-equal size, one
    MatMul each, and the results concatenated; up to 1024 rows, a transposed
    `a` or rows of unknown number are one MatMul.
    """
    rows = a.shape[0]
    if transpose_a or rows is None or rows <= MAX_BLOCK_ROWS:
        return tf.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    count = -(-rows // MAX_BLOCK_ROWS)
    sizes = [rows // count + (i < rows % count) for i in range(count)]
    blocks = tf.split(a, sizes)
    return tf.concat([tf.matmul(x, b, transpose_b=transpose_b) for x in blocks], 0)
