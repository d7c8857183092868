"""A run directory as training, evaluation and export use it; LEO restored from it.

`RunDirectory` is the bookkeeping that training, evaluation and export share:
its ownership (the trainer's lock), its config.json (checked against this
invocation's flags, written when training starts), the best record (read,
compared with a new meta-validation accuracy, promoted), which checkpoint to
restore, and test_results.json. Which checkpoint: training resumes from the
latest intact one; evaluation and export read the best checkpoint, else the
latest intact one, saying so.

`build_leo` builds LEO and the variables a checkpoint holds beside it, and
`CheckpointedLEO.restore` restores them, the same way for every command.

The file-level mechanics (the lock, atomic writes, validated records,
checkpoint integrity, the promotion itself) are in checkpoints.py.
"""

import contextlib
import dataclasses
import math
import pathlib

import keras
import tensorflow as tf
from absl import logging

from leo_tf import checkpoints, steps
from leo_tf import config as config_lib
from leo_tf.model import LEO

# A trainer promoting a new best removes the best checkpoint before the
# previous one, and rotates old checkpoints out; a reader whose checkpoint
# vanishes while it reads resolves it again, at most this many times in all.
RESTORE_ATTEMPTS = 3

# What a reader is doing, as its warnings say it.
_GERUNDS = {"evaluate": "evaluating", "export": "exporting"}


def best_record(config, step, accuracy):
    """metrics.json of a best checkpoint: its step, meta-validation accuracy
    and the task and number of episodes that accuracy was estimated on."""
    return {
        "step": step,
        "metavalid_accuracy": accuracy,
        "checkpoint": f"{checkpoints.CHECKPOINT_PREFIX}-{step}",
        "dataset_name": config.data.dataset_name,
        "num_classes": config.data.num_classes,
        "num_tr_examples_per_class": config.data.num_tr_examples_per_class,
        "num_metavalid_episodes": config.train.num_metavalid_batches
        * config.data.metavalid_batch_size,
    }


def model_config_of(saved):
    """The ModelConfig a run was trained with, from its config.json record."""
    return config_lib.ModelConfig(
        **{
            field.name: saved["model"][field.name]
            for field in dataclasses.fields(config_lib.ModelConfig)
        }
    )


@dataclasses.dataclass
class CheckpointedLEO:
    """LEO and the variables its checkpoints hold beside it.

    A training checkpoint holds the model, Adam's state, the step and the
    checkpoint's own meta-validation accuracy (NaN if it was not validated);
    readers (evaluation, export) build no optimizer and restore the model and
    the step only.
    """

    model: LEO
    step: tf.Variable
    checkpoint: tf.train.Checkpoint
    optimizer: keras.optimizers.Optimizer | None = None
    validation_accuracy: tf.Variable | None = None

    def restore(self, prefix):
        """Restores every variable built from checkpoint `prefix`; the step.

        With an optimizer the checkpoint must match exactly (a resumed
        training run); without, it may hold more (a reader). Raises
        tf.errors.NotFoundError if the files are missing.
        """
        status = self.checkpoint.restore(str(prefix))
        if self.optimizer is None:
            status.expect_partial().assert_existing_objects_matched()
        else:
            status.assert_consumed()
        return int(self.step.numpy())


def build_leo(
    model_config, embedding_dim, seed=None, optimizer_config=None, strategy=None
):
    """A new CheckpointedLEO for D = embedding_dim.

    With optimizer_config, for training: Adam built for the model's variables
    (both under `strategy`'s scope, if any) and the validation accuracy.
    """
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = LEO(model_config, embedding_dim, seed=seed)
        optimizer = None
        if optimizer_config is not None:
            optimizer = steps.make_optimizer(optimizer_config)
            optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    if optimizer is None:
        return CheckpointedLEO(model, step, tf.train.Checkpoint(model=model, step=step))
    validation_accuracy = tf.Variable(math.nan, dtype=tf.float64)
    checkpoint = tf.train.Checkpoint(
        model=model,
        optimizer=optimizer,
        step=step,
        validation_accuracy=validation_accuracy,
    )
    return CheckpointedLEO(model, step, checkpoint, optimizer, validation_accuracy)


class _Vanished(Exception):
    """The files of the checkpoint at args[0] were removed while being read."""


def _vanished(prefix):
    """Whether no file of the checkpoint at `prefix` is left."""
    prefix = pathlib.Path(prefix)
    return not any(prefix.parent.glob(f"{prefix.name}.*"))


class RunDirectory:
    """The run directory under `path`: ownership, records, best checkpoint.

    As a context manager it releases the trainer's lock, if taken, on exit.
    """

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.lock = checkpoints.RunLock(self.path)
        # metrics.json of the intact best checkpoint (training, chief only).
        self.best_record = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lock.release()

    # --- Configuration -------------------------------------------------------

    def check_usable(self, for_writing, writes=None):
        """CheckpointError unless the directory can be read (and written, for
        what `writes` says: see checkpoints.check_usable)."""
        checkpoints.check_usable(self.path, for_writing, writes)

    def check_compatible(self, config, embedding_dim, fixed):
        """ConfigError unless `config` agrees with config.json on `fixed`
        (checkpoints.FIXED_ON_RESUME or FIXED_FOR_EVALUATION)."""
        checkpoints.check_compatible(self.path, config, embedding_dim, fixed)

    def read_config(self):
        """The run's config.json, validated, or None if there is none."""
        return checkpoints.read_config(self.path)

    def write_config(self, config, embedding_dim):
        """Writes config.json: the run's flags and its data's D."""
        checkpoints.write_json_atomically(
            self.path / checkpoints.CONFIG_FILE,
            {**config.to_dict(), "embedding_dim": embedding_dim},
        )

    def write_results(self, results):
        """Writes test_results.json atomically."""
        checkpoints.write_json_atomically(self.path / checkpoints.RESULTS_FILE, results)

    # --- Training: ownership and resuming -------------------------------------

    def open_for_training(self, chief):
        """Checks the directory before a trainer reads it.

        On the chief, the directory must be writable (or creatable) and, if
        it exists, the lock is taken before its state is read. Other workers
        only read it, and the chief may not have made it yet.
        """
        if chief or self.path.exists():
            self.check_usable(for_writing=chief)
        if chief and self.path.exists():
            self.lock.acquire()

    def create_for_training(self):
        """Makes the directory, holding its lock, free of half-written files.

        Refuses if another trainer wrote checkpoints into a directory that
        did not exist when this one opened it.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise checkpoints.CheckpointError(
                f"--checkpoint_path={self.path}: cannot be created ({error})"
            ) from error
        if not self.lock.held:
            self.lock.acquire()
            if checkpoints.checkpoint_prefixes(self.path):
                raise checkpoints.CheckpointError(
                    f"--checkpoint_path={self.path}: another trainer wrote "
                    "checkpoints there while this one was starting; rerun to "
                    "resume from them"
                )
        checkpoints.remove_stale_temporaries(self.path)

    def restore_latest(self, leo):
        """Restores `leo` from the latest intact checkpoint; its prefix, or
        None if there is no checkpoint (a new run). CheckpointError if a
        newer, damaged checkpoint has a file the next saves cannot replace."""
        latest = checkpoints.latest_intact_checkpoint(self.path)
        checkpoints.check_newer_replaceable(self.path, latest)
        if latest:
            step = leo.restore(latest)
            logging.info("Resuming from %s at step %d", latest, step)
        return latest

    def index(self, prefix):
        """Makes TensorFlow's `checkpoint` index name `prefix` as the latest."""
        checkpoints.index_checkpoint(self.path, prefix)

    # --- The best checkpoint ---------------------------------------------------

    def load_best_record(self):
        """Reads the best record: metrics.json of best_checkpoint, or None if
        there is none or it is damaged (the next validated checkpoint then
        replaces it)."""
        self.best_record = None
        best = checkpoints.best_checkpoint(self.path)
        if best is None:
            return
        try:
            checkpoints.verify_checkpoint(best[0])
        except checkpoints.CheckpointError as error:
            logging.warning(
                "best_checkpoint unusable, %s; the next validated checkpoint "
                "replaces it",
                error,
            )
            return
        self.best_record = best[1]

    def beats_best(self, accuracy):
        """Whether a meta-validation accuracy beats the best record."""
        best = self.best_record
        return best is None or accuracy > best["metavalid_accuracy"]

    def describe_best(self):
        """'0.9123 at step 40': the best record, for the log."""
        best = self.best_record
        return f"{best['metavalid_accuracy']:.4f} at step {best['step']}"

    def promote(self, prefix, record):
        """Makes checkpoint `prefix` best_checkpoint, with metrics.json `record`."""
        checkpoints.promote_to_best(self.path, prefix, record)
        self.best_record = record

    def promote_if_better(self, prefix, record):
        """Promotes the restored latest checkpoint if its recorded accuracy
        beats the best record: the run died before promoting it."""
        if math.isnan(record["metavalid_accuracy"]):
            return
        if self.beats_best(record["metavalid_accuracy"]):
            self.promote(prefix, record)
            logging.info(
                "Promoted %s (accuracy %.4f) to best_checkpoint",
                prefix,
                record["metavalid_accuracy"],
            )

    # --- Readers: evaluation and export ----------------------------------------

    def checkpoint_to_read(self, which, purpose):
        """(prefix, "best" or "latest"): the checkpoint a reader restores.

        Args:
          which: "best" for best_checkpoint if it reads back whole, else the
            latest intact checkpoint, saying why; "latest" for the latest
            intact checkpoint.
          purpose: "evaluate" or "export", as the warnings and errors say.

        Raises CheckpointError if there is no intact checkpoint, and
        _Vanished if the best checkpoint's files were removed meanwhile.
        """
        gerund = _GERUNDS[purpose]
        if which == "best":
            best = self._intact_best_prefix(gerund)
            if best is not None:
                return best, "best"
        prefix = checkpoints.latest_intact_checkpoint(
            self.path, remedy=f"nothing to {purpose}"
        )
        if prefix is None:
            raise checkpoints.CheckpointError(
                f"--checkpoint_path={self.path}: no checkpoint to {purpose} "
                "(train first, or point at a training directory)"
            )
        if which == "best":
            logging.warning("%s %s", gerund.capitalize(), prefix)
        return prefix, "latest"

    def _intact_best_prefix(self, gerund):
        """best_checkpoint's prefix in its real directory if it reads back
        whole; else None, with a warning saying what the reader does."""
        best = checkpoints.best_checkpoint_prefix(self.path)
        if best is None:
            logging.warning(
                "No best_checkpoint in %s: %s the latest intact checkpoint",
                self.path,
                gerund,
            )
            return None
        try:
            checkpoints.verify_checkpoint(best)
        except checkpoints.CheckpointError as error:
            if _vanished(best):
                raise _Vanished(best) from error
            logging.warning(
                "best_checkpoint unusable, %s; %s the latest intact checkpoint "
                "instead",
                error,
                gerund,
            )
            return None
        return best

    def restore_for_reading(self, leo, which, purpose):
        """Restores `leo` (built without an optimizer) from checkpoint_to_read.

        Returns (prefix, "best" or "latest", step). A checkpoint whose files
        vanish while being read (a trainer promoted a new best or rotated old
        checkpoints out meanwhile) is resolved again, RESTORE_ATTEMPTS times
        in all; then CheckpointError says so.
        """
        prefix = None
        for _ in range(RESTORE_ATTEMPTS):
            try:
                prefix, source = self.checkpoint_to_read(which, purpose)
                return prefix, source, leo.restore(prefix)
            except _Vanished as vanished:
                prefix = vanished.args[0]
            except tf.errors.NotFoundError:
                pass
            logging.warning("%s vanished while being read; resolving again", prefix)
        raise checkpoints.CheckpointError(
            f"--checkpoint_path={self.path}: the {which} checkpoint was replaced "
            f"while being read, {RESTORE_ATTEMPTS} times in a row (last {prefix}); "
            "try again"
        )
