"""tf.distribute strategies for data-parallel meta-training.

`--distribution=mirrored` uses every local device (MirroredStrategy);
`--distribution=multi_worker` spans the machines that TF_CONFIG lists
(MultiWorkerMirroredStrategy). The meta-batch is split over the replicas
(see steps.distributed_train_step_fn). The chief (worker 0, or the "chief"
task) writes every file; the other workers restore from the chief's
--checkpoint_path, which must be on a file system they share, and save their
(identical) checkpoints into a private temporary directory, as TensorFlow's
multi-worker checkpointing requires.
"""

import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from leo_tf.config import ConfigError


def make_strategy(name):
    """The strategy for --distribution=name, or None for "none".

    For multi_worker, call this before TensorFlow runs any op.
    """
    if name == "none":
        return None
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        check_tf_config(os.environ.get("TF_CONFIG"))
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown distribution {name!r}")


def check_tf_config(text):
    """ConfigError unless TF_CONFIG's `text` is unset (None: one worker) or a
    JSON object with a "cluster" object and a "task" object holding "type"
    and "index", as tf.distribute reads it."""
    if text is None:
        return
    where = "--distribution=multi_worker: the TF_CONFIG environment variable"
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"{where} is not JSON ({error})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where} is not a JSON object")
    if not isinstance(value.get("cluster"), dict):
        raise ConfigError(f'{where} has no "cluster" object (task type -> addresses)')
    task = value.get("task")
    if not isinstance(task, dict) or not {"type", "index"} <= set(task):
        raise ConfigError(f'{where} has no "task" object with "type" and "index"')


def is_chief(strategy):
    """True in single-process runs and on the chief of a multi-worker run."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def weights_digest(model):
    """sha256 of the model's weights: equal on every replica of a run."""
    digest = hashlib.sha256()
    for variable in model.trainable_variables:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()
