"""Process-wide TensorFlow settings that suit LEO's many small ops on CPUs."""

import os

import tensorflow as tf


def _cores():
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _has_gpu():
    return bool(tf.config.list_physical_devices("GPU"))


def unbatched_matmuls():
    """Whether this host runs LEO's per-episode matmuls best as separate 2-D
    MatMuls (CPUs: no GPU visible); see `steps.host_matmul`."""
    return not _has_gpu()


def num_towers(requested, batch_size):
    """How many towers to split a meta-batch of batch_size into.

    requested: --num_towers; 0 picks one per CPU core when no GPU is visible
    (a GPU runs one large tower best), reduced to a divisor of batch_size.
    """
    if requested:
        return requested
    if _has_gpu():
        return 1
    towers = min(_cores(), batch_size)
    while batch_size % towers:
        towers -= 1
    return towers


def configure_threads():
    """Runs independent small ops side by side rather than splitting each.

    LEO's step is thousands of small ops; on CPU, running independent ops in
    parallel (one inter-op thread per core) beats splitting each op over
    threads (intra-op; BUILD.md, Performance). Must run before TensorFlow
    executes its first op; a no-op afterwards.
    """
    try:
        tf.config.threading.set_inter_op_parallelism_threads(_cores())
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already initialised: keep its settings.
        pass
