"""The cosine nearest-class-mean baseline: no learning, raw embeddings.

Each query is assigned the class whose prototype, the mean of its
L2-normalised support embeddings scaled to unit norm, has the highest cosine
similarity with it; ties go to the lowest label. Printed next to LEO's
accuracy, it shows how much meta-learning adds. This module is the
project's one definition of it: meta-test (`meta_eval.py`), the synthetic
data set's figures and `benchmarks/ncm_baseline.py` all use it.
"""

import numpy as np


def class_prototypes(support):
    """Unit-norm class means of normalised support embeddings.

    Args:
      support: float [..., N, K, D], each example of unit L2 norm.

    Returns:
      float32 [..., N, D]: mean over K, divided by max(its norm, 1e-12).
    """
    means = np.asarray(support, np.float32).mean(axis=-2)
    means /= np.maximum(np.linalg.norm(means, axis=-1, keepdims=True), 1e-12)
    return means


def nearest_class_mean_predictions(support, queries):
    """The label of the nearest class mean of each query.

    argmax of cosine = argmax of <query, unit prototype>: a query's norm is
    common to all classes.

    Args:
      support: float [..., N, K, D], each example of unit L2 norm.
      queries: float [..., M, D].

    Returns:
      int [..., M], labels in 0..N-1.
    """
    prototypes = class_prototypes(support)  # [..., N, D]
    # Plain einsum: BLAS-backed forms (np.matmul) took 4-6x as long on
    # evaluation batches, waking BLAS threads for each of B small products.
    scores = np.einsum(
        "...md,...nd->...mn", np.asarray(queries, np.float32), prototypes
    )  # [..., M, N]
    return scores.argmax(axis=-1)


def nearest_class_mean_accuracy(tr_input, val_input, val_output):
    """Per-episode accuracy of the cosine nearest-class-mean classifier.

    Args:
      tr_input: float [B, N, K, D] support embeddings, unit L2 norm.
      val_input: float [B, N, V, D] query embeddings.
      val_output: int [B, N, V, 1] query labels.

    Returns:
      float64 [B].
    """
    batch, num_classes, num_val, dim = np.shape(val_input)
    queries = np.reshape(val_input, (batch, num_classes * num_val, dim))
    predictions = nearest_class_mean_predictions(tr_input, queries)
    labels = np.reshape(np.asarray(val_output)[..., 0], (batch, -1))
    return (predictions == labels).mean(axis=1, dtype=np.float64)


def mean_and_ci95(values):
    """(mean, 1.96 * std / sqrt(n)) of per-episode values."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(1.96 * values.std() / np.sqrt(values.size))
