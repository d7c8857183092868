"""The cosine nearest-class-mean baseline: no learning, raw embeddings.

Each query is assigned the class whose mean support embedding (of the
L2-normalised examples) has the highest cosine similarity with it. Printed
next to LEO's accuracy, it shows how much meta-learning adds.
"""

import numpy as np


def nearest_class_mean_accuracy(tr_input, val_input, val_output):
    """Per-episode accuracy of the cosine nearest-class-mean classifier.

    Args:
      tr_input: float [B, N, K, D] support embeddings.
      val_input: float [B, N, V, D] query embeddings.
      val_output: int [B, N, V, 1] query labels.

    Returns:
      float64 [B].
    """
    tr_input = np.asarray(tr_input, np.float32)
    val_input = np.asarray(val_input, np.float32)
    batch, num_classes, num_val, dim = val_input.shape
    means = tr_input.mean(axis=2)  # [B, N, D]
    means /= np.maximum(np.linalg.norm(means, axis=-1, keepdims=True), 1e-12)
    # argmax of cosine = argmax of <query, unit mean>: the query's norm is
    # common to all classes.
    scores = np.matmul(
        val_input.reshape(batch, num_classes * num_val, dim),
        means.transpose(0, 2, 1),
    )  # [B, NV, N]
    predictions = scores.argmax(axis=-1).reshape(batch, num_classes, num_val)
    labels = np.asarray(val_output)[..., 0]
    return (predictions == labels).mean(axis=(1, 2), dtype=np.float64)


def mean_and_ci95(values):
    """(mean, 1.96 * std / sqrt(n)) of per-episode values."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(1.96 * values.std() / np.sqrt(values.size))
