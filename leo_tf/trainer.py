"""Meta-training of LEO on a run directory.

`train` follows the authors' protocol: num_steps_limit meta-training steps;
every checkpoint_steps a checkpoint, a meta-validation estimate (the mean
accuracy of num_metavalid_batches meta-validation batches, new ones at every
checkpoint as in the authors' code, or the same ones with
--fixed_metavalid_batches) and, when it is the best so far, an atomic
promotion to `best_checkpoint`. A run restarted on the same directory
resumes from the latest intact checkpoint at exactly its step: batches and noise are pure functions of (seed, step), so the data
"state" is the step itself, and each checkpoint records its own validation
accuracy, so a promotion cut short by preemption is completed on restart.

The trainer owns the directory while it runs (the lock of
run_directory.RunDirectory; in a multi-worker run the chief's). Everything that can be wrong with flags, data,
the directory or its agreement with the run's config.json is checked before
the first file is written; a failing write (disk full, read-only) ends in a
CheckpointError naming the path, and the next run resumes.

Its parts: `_Data` (samplers), `_TrainingLoop` (the steps, and what happens
at checkpoint steps), `_Validation` (which batches, the estimate), `_Saver`
(the latest checkpoints), `_Summaries` (TensorBoard); the run directory's
bookkeeping is run_directory.RunDirectory's.
"""

import contextlib
import math
import pathlib
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl import logging

from leo_tf import (
    checkpoints,
    distribute,
    error_text,
    meta_eval,
    progress,
    run_directory,
    runtime,
    steps,
    stop_request,
)
from leo_tf import noise as noise_lib
from leo_tf.config import ConfigError
from leo_tf.data import episodes as episodes_lib
from leo_tf.data import meta_dataset


def _finite(model):
    return all(np.all(np.isfinite(v.numpy())) for v in model.trainable_variables)


def warn_towers_under_strategy(config, strategy):
    """Warns that an explicit --num_towers > 1 does not split the training
    step under a tf.distribute strategy (each replica runs its share of the
    meta-batch as one tower); evaluation still uses the towers."""
    towers = config.train.num_towers
    if strategy is not None and towers > 1:
        logging.warning(
            "--num_towers=%d: under --distribution=%s each replica trains its "
            "share of the meta-batch as one tower; the towers split only the "
            "evaluation batches",
            towers,
            config.train.distribution,
        )


def _validate(evaluator, num_batches, first_batch):
    """Mean accuracy and query loss over meta-validation batches.

    Batches first_batch .. first_batch + num_batches - 1 of the evaluator's
    sampler, each a pure function of the run's seed and its index.
    """
    episodes = evaluator.evaluate(first_batch, num_batches)
    return float(np.mean(episodes.accuracy)), float(np.mean(episodes.query_loss))


class _Summaries:
    """TensorBoard summaries: the chief's file writer, a no-op one elsewhere.

    A failure to write them (disk full, read-only) is a CheckpointError
    naming the directory and the latest checkpoint, `latest()`.
    """

    def __init__(self, directory, chief, latest):
        self.directory = directory
        self._chief = chief
        self._latest = latest
        self._writer = None

    @property
    def writer(self):
        """The file writer, made on first use: a rerun with no step to train
        adds no events file."""
        if self._writer is None:
            with self.writing():
                self._writer = (
                    tf.summary.create_file_writer(str(self.directory))
                    if self._chief
                    else tf.summary.create_noop_writer()
                )
        return self._writer

    @contextlib.contextmanager
    def writing(self):
        """Turns a failing summary write into a CheckpointError (but not a
        closed standard output: the progress line is printed in here)."""
        try:
            yield
        except BrokenPipeError:
            raise
        except (OSError, tf.errors.OpError) as error:
            raise checkpoints.CheckpointError(
                f"could not write TensorBoard summaries to {self.directory}: "
                f"{error_text.summary(error)}. "
                + checkpoints.what_is_kept(self._latest(), " and best_checkpoint")
            ) from error

    def scalars(self, step, values):
        """Writes and flushes {name: value} at `step`."""
        with self.writing(), self.writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)
            self.writer.flush()

    def flush(self):
        if self._writer is not None:
            with self.writing():
                self._writer.flush()


class _Saver:
    """The latest checkpoints (the 5 newest), never of non-finite weights."""

    def __init__(self, leo, saving_directory):
        self.leo = leo
        self.manager = tf.train.CheckpointManager(
            leo.checkpoint,
            str(saving_directory),
            max_to_keep=5,
            checkpoint_name=checkpoints.CHECKPOINT_PREFIX,
        )

    def latest(self):
        return self.manager.latest_checkpoint

    def save(self):
        """Saves a checkpoint unless the weights are non-finite; its prefix."""
        step = int(self.leo.step.numpy())
        if not _finite(self.leo.model):
            logging.error(
                "Refusing to checkpoint step %d: the weights are not finite. "
                "Keeping %s.",
                step,
                self.manager.latest_checkpoint,
            )
            return None
        return checkpoints.save_checkpoint(
            self.manager, step, also_intact=" and best_checkpoint"
        )


class _Validation:
    """Meta-validation of a checkpoint: its batches, estimate and summaries.

    Checkpoint step s is validated on batches s * num_batches onwards (new
    ones every time, as in the authors' code), or on batches 0 onwards with
    --fixed_metavalid_batches.
    """

    def __init__(self, evaluator, train_config, summaries):
        self.evaluator = evaluator
        self.num_batches = train_config.num_metavalid_batches
        self.fixed = train_config.fixed_metavalid_batches
        self.summaries = summaries

    def first_batch(self, step):
        return 0 if self.fixed else step * self.num_batches

    def estimate(self, step):
        """Mean meta-validation accuracy at `step`, also summarised with the loss."""
        accuracy, loss = _validate(
            self.evaluator, self.num_batches, self.first_batch(step)
        )
        self.summaries.scalars(
            step, {"validation/accuracy": accuracy, "validation/loss": loss}
        )
        return accuracy


class _Data:
    """The run's meta-train and meta-validation samplers and D."""

    def __init__(self, config, strategy):
        train_classes = meta_dataset.load_classes(config.data, "train")
        self.embedding_dim = train_classes.embedding_dim
        val_classes = meta_dataset.load_classes(
            config.data, "val", embedding_dim=self.embedding_dim
        )
        replicas = strategy.num_replicas_in_sync if strategy else 1
        if config.data.metatrain_batch_size % replicas:
            raise ConfigError(
                f"--metatrain_batch_size={config.data.metatrain_batch_size}: "
                f"must be a multiple of the {replicas} replicas of "
                f"--distribution={config.train.distribution}"
            )
        seed = config.train.seed
        self.train_sampler = meta_dataset.train_sampler(
            config.data, train_classes, seed
        )
        self.val_sampler = meta_dataset.eval_sampler(
            config.data, val_classes, "val", seed
        )


class _TrainingLoop:
    """The steps from the restored one to num_steps_limit, checkpointing and
    validating every checkpoint_steps; SIGTERM / SIGINT save and stop."""

    def __init__(self, config, strategy, chief, directory, data, leo, saving_dir):
        self.config = config
        self.chief = chief
        self.directory = directory
        self.data = data
        self.leo = leo
        self.saver = _Saver(leo, saving_dir)
        warn_towers_under_strategy(config, strategy)
        self.train_step = steps.compile_train_step(
            leo.model,
            leo.optimizer,
            config.optimizer,
            data.train_sampler.element_spec,
            jit_compile=config.train.jit_compile,
            strategy=strategy,
            num_towers=runtime.num_towers(
                config.train.num_towers, config.data.metatrain_batch_size
            ),
        )
        evaluator = meta_eval.MetaEvaluator(
            leo.model,
            data.val_sampler,
            with_baseline=False,  # meta-validation reports LEO alone
            jit_compile=config.train.jit_compile,
            num_towers=runtime.num_towers(
                config.train.num_towers, config.data.metavalid_batch_size
            ),
        )
        self.summaries = _Summaries(directory.path, chief, self.saver.latest)
        self.validation = _Validation(evaluator, config.train, self.summaries)

    def _dataset(self, first_step, limit):
        """(step, episodes), noise of steps first_step .. limit - 1."""
        config = self.config
        spec = self.data.train_sampler.element_spec
        # Episodes' indices are sampled on request and gathered in TensorFlow,
        # noise is drawn ahead by tf.data: both are pure functions of
        # (seed, step).
        return tf.data.Dataset.zip(
            episodes_lib.make_dataset(
                self.data.train_sampler, first_step, limit - first_step
            ),
            noise_lib.noise_dataset(
                config.train.seed,
                first_step,
                limit - first_step,
                spec.tr_input.shape.as_list(),
                spec.val_input.shape.as_list(),
                config.model,
            ),
        )

    def run(self):
        """Trains to num_steps_limit; returns a summary dict."""
        config = self.config
        first_step = int(self.leo.step.numpy())
        limit = config.train.num_steps_limit
        if first_step >= limit:
            logging.info(
                "Step %d already reaches --num_steps_limit=%d", first_step, limit
            )
            return {"step": first_step}
        log = progress.TrainingLog(
            self.summaries.writer, self.leo.model, first_step, limit, verbose=self.chief
        )
        outcome = {}
        with stop_request.StopRequest(
            "training saves the current step and stops"
        ) as stop:
            for (step_tensor, episodes), noise in self._dataset(first_step, limit):
                metrics = self.train_step(episodes, noise)
                step = int(step_tensor) + 1
                self.leo.step.assign(step)
                log.add(metrics)
                if step == first_step + 1:
                    log.restart_clock(step)  # steps/s without the tracing time
                if step % config.train.summary_steps == 0 or step == limit:
                    with stop.output_closed_stops(), self.summaries.writing():
                        log.write(step)
                checkpointed = step % config.train.checkpoint_steps == 0
                checkpointed = checkpointed or step == limit
                if checkpointed:
                    outcome = self._checkpoint(step)
                    log.restart_clock(step)  # validation time is not training speed
                if stop.signal:
                    outcome = self._stop(stop.signal, step, checkpointed)
                    break
        self.summaries.flush()
        logging.info(
            "Step %d: weights digest %s",
            self.leo.step.numpy(),
            distribute.weights_digest(self.leo.model),
        )
        return {"step": int(self.leo.step.numpy()), **outcome}

    def _stop(self, signal_name, step, checkpointed):
        """Saves `step` unless its checkpoint was just written (with its
        meta-validation accuracy, which a second save would overwrite with
        NaN); the outcome: the signal, and whether the step is saved."""
        if checkpointed:
            logging.warning("%s received: stopping after step %d", signal_name, step)
        else:
            logging.warning(
                "%s received: saving step %d and stopping", signal_name, step
            )
            self.leo.validation_accuracy.assign(math.nan)
            self.saver.save()
        latest = self.saver.latest()
        saved = latest is not None and latest.endswith(
            f"{checkpoints.CHECKPOINT_PREFIX}-{step}"
        )
        return {"stopped_by": signal_name, "saved": saved}

    def _checkpoint(self, step):
        """Validates (chief), saves with the accuracy inside, promotes if best."""
        if not self.chief or not _finite(self.leo.model):
            self.saver.save()  # on the chief, logs the refusal
            return {}
        accuracy = self.validation.estimate(step)
        self.leo.validation_accuracy.assign(accuracy)
        prefix = self.saver.save()
        checkpoints.crash_point("save:done")
        is_best = self.directory.beats_best(accuracy)
        logging.info(
            "Step %d: meta-validation accuracy %.4f (best %s)",
            step,
            accuracy,
            "now" if is_best else self.directory.describe_best(),
        )
        if is_best and prefix:
            self.directory.promote(
                prefix, run_directory.best_record(self.config, step, accuracy)
            )
        return {"metavalid_accuracy": accuracy, "is_best": is_best}


def _prepare_for_writing(config, directory, data, leo, latest):
    """Creates the directory, writes config.json, completes a promotion cut
    short; the directory checkpoints are saved to."""
    directory.create_for_training()
    if latest:
        directory.index(latest)
    directory.write_config(config, data.embedding_dim)
    if latest:
        accuracy = float(leo.validation_accuracy.numpy())
        directory.promote_if_better(
            latest, run_directory.best_record(config, int(leo.step.numpy()), accuracy)
        )
    return directory.path


def train(config, strategy=None):
    """Meta-trains on config; returns {"step": ..., and the last validation}.

    Raises ConfigError, DataError or CheckpointError, naming the flag, file or
    directory, before anything is written when the inputs are unusable. On
    the non-chief workers of a multi-worker run, nothing is written under the
    directory: they save into a private temporary directory, as TensorFlow's
    multi-worker checkpointing requires, and remove it at the end.
    """
    chief = distribute.is_chief(strategy)
    with run_directory.RunDirectory(config.train.checkpoint_path) as directory:
        directory.open_for_training(chief)
        data = _Data(config, strategy)
        directory.check_compatible(
            config, data.embedding_dim, checkpoints.FIXED_ON_RESUME
        )
        if chief:
            directory.load_best_record()
        leo = run_directory.build_leo(
            config.model,
            data.embedding_dim,
            seed=config.train.seed,
            optimizer_config=config.optimizer,
            strategy=strategy,
        )
        latest = directory.restore_latest(leo)
        if chief:
            saving_dir = _prepare_for_writing(config, directory, data, leo, latest)
        else:
            saving_dir = pathlib.Path(tempfile.mkdtemp(prefix="leo_tf_worker_"))
        try:
            return _TrainingLoop(
                config, strategy, chief, directory, data, leo, saving_dir
            ).run()
        finally:
            if not chief:
                shutil.rmtree(saving_dir, ignore_errors=True)
