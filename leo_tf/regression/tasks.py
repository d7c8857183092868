"""The few-shot regression tasks of the paper (Rusu et al. 2019, Section 5.1).

A task is, with equal probability, a sinusoid y = A sin(x - phase), with
A ~ U[0.1, 5] and phase ~ U[0, pi], or a line y = slope x + intercept, with
slope, intercept ~ U[-3, 3]. Its inputs are x ~ U[-5, 5] and its observations
y carry Gaussian noise of a fixed stddev (0.3 in the paper). A few (K) noisy
points are the support set; other points of the same task are the queries.

Everything is a pure function of a NumPy generator, and `task_rng` makes the
generator of one batch from (seed, stream, index), so any batch of any run can
be drawn again on its own (e.g. after resuming from a checkpoint).
"""

from typing import NamedTuple

import numpy as np

SINE, LINE = 0, 1
X_RANGE = (-5.0, 5.0)
AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, np.pi)
SLOPE_RANGE = (-3.0, 3.0)
INTERCEPT_RANGE = (-3.0, 3.0)

# Independent streams of batches of one run.
TRAIN_STREAM, VALIDATION_STREAM, TEST_STREAM = 0, 1, 2
NUM_STREAMS = 3


class Tasks(NamedTuple):
    """A batch of B tasks. Every task has all four parameters; `kind` says
    which pair its function uses."""

    kind: np.ndarray  # [B] int, SINE or LINE
    amplitude: np.ndarray  # [B]
    phase: np.ndarray  # [B]
    slope: np.ndarray  # [B]
    intercept: np.ndarray  # [B]

    def __call__(self, x):
        """The noise-free functions at x: [B, M] -> [B, M]."""
        sine = self.amplitude[:, None] * np.sin(x - self.phase[:, None])
        line = self.slope[:, None] * x + self.intercept[:, None]
        return np.where(self.kind[:, None] == SINE, sine, line)


class Batch(NamedTuple):
    """The data of B tasks, float32. K support and V query points each."""

    support_x: np.ndarray  # [B, K, 1]
    support_y: np.ndarray  # [B, K, 1] noisy observations
    query_x: np.ndarray  # [B, V, 1]
    query_y: np.ndarray  # [B, V, 1] noisy observations
    query_truth: np.ndarray  # [B, V, 1] the noise-free function values


def task_rng(seed, stream, index):
    """The NumPy generator of batch `index` of a stream of a run's seed."""
    return np.random.default_rng([seed, stream, index])


def sample_tasks(rng, batch_size):
    """B tasks, each a sinusoid or a line with probability 1/2."""
    return Tasks(
        kind=rng.integers(0, 2, size=batch_size),
        amplitude=rng.uniform(*AMPLITUDE_RANGE, size=batch_size),
        phase=rng.uniform(*PHASE_RANGE, size=batch_size),
        slope=rng.uniform(*SLOPE_RANGE, size=batch_size),
        intercept=rng.uniform(*INTERCEPT_RANGE, size=batch_size),
    )


def observe(rng, tasks, x, noise_stddev):
    """(noisy y, noise-free f(x)), both [B, M], of the tasks at x [B, M]."""
    truth = tasks(x)
    return truth + noise_stddev * rng.standard_normal(truth.shape), truth


def sample_batch(rng, batch_size, num_shots, num_queries, noise_stddev):
    """(Tasks, Batch) of B new tasks with K support and V query points each."""
    tasks = sample_tasks(rng, batch_size)
    x = rng.uniform(*X_RANGE, size=(batch_size, num_shots + num_queries))
    y, truth = observe(rng, tasks, x, noise_stddev)

    def column(values):
        return values[..., None].astype(np.float32)

    return tasks, Batch(
        support_x=column(x[:, :num_shots]),
        support_y=column(y[:, :num_shots]),
        query_x=column(x[:, num_shots:]),
        query_y=column(y[:, num_shots:]),
        query_truth=column(truth[:, num_shots:]),
    )
