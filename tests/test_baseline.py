"""The cosine nearest-class-mean baseline against a per-query computation."""

import math

import numpy as np
import pytest

from leo_tf import baseline


def _per_query_accuracy(tr_input, val_input, val_output):
    """The baseline written out query by query: the class whose mean support
    embedding has the largest cosine similarity with the query. [B]"""
    batch, num_classes, num_val, _ = val_input.shape
    accuracies = []
    for b in range(batch):
        means = [
            tr_input[b, c].astype(np.float64).mean(axis=0) for c in range(num_classes)
        ]
        correct = 0
        for c in range(num_classes):
            for v in range(num_val):
                query = val_input[b, c, v].astype(np.float64)
                cosines = [
                    query @ mean / (np.linalg.norm(query) * np.linalg.norm(mean))
                    for mean in means
                ]
                correct += int(np.argmax(cosines) == val_output[b, c, v, 0])
        accuracies.append(correct / (num_classes * num_val))
    return np.array(accuracies)


def test_accuracy_equals_the_per_query_computation():
    rng = np.random.default_rng(0)
    batch, classes, shots, queries, dim = 6, 5, 3, 4, 8
    centres = rng.normal(size=(batch, classes, 1, dim))
    tr_input = (centres + rng.normal(size=(batch, classes, shots, dim))).astype(
        np.float32
    )
    val_input = (centres + rng.normal(size=(batch, classes, queries, dim))).astype(
        np.float32
    )
    # Queries scaled by different positive factors: the cosine ignores them.
    val_input *= rng.uniform(0.1, 10.0, size=(batch, classes, queries, 1))
    # Labels are what the row of the support set says, not the query's row:
    # a permutation per episode.
    labels = np.stack([rng.permutation(classes) for _ in range(batch)])
    val_output = np.broadcast_to(
        labels[:, :, None, None], (batch, classes, queries, 1)
    ).astype(np.int32)

    accuracy = baseline.nearest_class_mean_accuracy(tr_input, val_input, val_output)

    expected = _per_query_accuracy(tr_input, val_input, val_output)
    assert accuracy.shape == (batch,) and accuracy.dtype == np.float64
    np.testing.assert_allclose(accuracy, expected, rtol=0, atol=1e-12)
    assert len(set(expected)) > 2  # the episodes differ, some above chance


def test_the_class_mean_not_the_nearest_example_decides():
    # Class 0's support: (1, 0) and (0, 1), mean direction 45 degrees. Class
    # 1's: (1, 0.9) twice, at 42 degrees. The query at 10 degrees is nearest
    # to the example (1, 0) of class 0 but to the mean of class 1.
    tr_input = np.array([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.9], [1.0, 0.9]]]])
    query = [math.cos(math.radians(10)), math.sin(math.radians(10))]
    val_input = np.array([[[query], [[-1.0, 0.2]]]])
    val_output = np.array([[[[0]], [[1]]]])
    # The first query goes to class 1 (wrong), the second, at 169 degrees,
    # to class 0 (wrong too).
    assert baseline.nearest_class_mean_accuracy(tr_input, val_input, val_output) == [
        0.0
    ]
    np.testing.assert_array_equal(
        baseline.nearest_class_mean_accuracy(
            tr_input, val_input, np.array([[[[1]], [[0]]]])
        ),
        [1.0],
    )


def test_mean_and_ci95_by_hand():
    mean, ci95 = baseline.mean_and_ci95([0.2, 0.4, 0.6, 0.8])
    # Population std sqrt(((0.3^2 + 0.1^2) * 2) / 4) = sqrt(0.05).
    assert mean == pytest.approx(0.5)
    assert ci95 == pytest.approx(1.96 * math.sqrt(0.05) / 2)
    assert baseline.mean_and_ci95([0.7] * 5) == (pytest.approx(0.7), 0.0)
