"""Meta-training of LEO on a run directory.

`train` follows the authors' protocol: num_steps_limit meta-training steps;
every checkpoint_steps a checkpoint, a meta-validation estimate (the mean
accuracy of num_metavalid_batches meta-validation batches, new ones at every
checkpoint as in the authors' code, or the same ones with
--fixed_metavalid_batches) and, when it is the best so far, an atomic promotion to `best_checkpoint`. A run restarted
on the same directory resumes from the latest intact checkpoint at exactly
its step: batches and noise are pure functions of (seed, step), so the data
"state" is the step itself, and each checkpoint records its own validation
accuracy, so a promotion cut short by preemption is completed on restart.

The trainer owns the directory while it runs (checkpoints.RunLock; in a
multi-worker run the chief). Everything that can be wrong with flags, data,
the directory or its agreement with the run's config.json is checked before
the first file is written; a failing write (disk full, read-only) ends in a
CheckpointError naming the path, and the next run resumes.
"""

import contextlib
import math
import pathlib
import shutil
import signal
import tempfile

import numpy as np
import tensorflow as tf
from absl import logging

from leo_tf import checkpoints, distribution, meta_eval, progress, runtime, steps
from leo_tf import noise as noise_lib
from leo_tf.config import ConfigError
from leo_tf.data import episodes as episodes_lib
from leo_tf.data import meta_dataset
from leo_tf.model import LEO


def _finite(model):
    return all(np.all(np.isfinite(v.numpy())) for v in model.trainable_variables)


class _StopRequest:
    """Turns SIGTERM / SIGINT into a request to checkpoint and stop."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        del frame
        self.signal = signal.Signals(number).name

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _validate(evaluator, num_batches, first_batch):
    """Mean accuracy and query loss over meta-validation batches.

    Batches first_batch .. first_batch + num_batches - 1 of the evaluator's
    sampler, each a pure function of the run's seed and its index.
    """
    episodes = evaluator.evaluate(first_batch, num_batches)
    return float(np.mean(episodes.accuracy)), float(np.mean(episodes.query_loss))


def _best_record(config, step, accuracy):
    """metrics.json of a best checkpoint."""
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


class _Session:
    """One invocation of training on a run directory.

    Construction validates everything and restores the latest checkpoint
    without writing anything; `run` then trains. On the non-chief workers of
    a multi-worker run, nothing is written under the directory.
    """

    def __init__(self, config, strategy, lock):
        self.config = config
        self.strategy = strategy
        self.chief = distribution.is_chief(strategy)
        self.directory = pathlib.Path(config.train.checkpoint_path)
        self.lock = lock
        if self.chief or self.directory.exists():
            # Other workers only read, and the chief may not have made it yet.
            checkpoints.check_usable(self.directory, for_writing=self.chief)
        if self.chief and self.directory.exists():
            lock.acquire()  # before reading the directory's state
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
        checkpoints.check_compatible(
            self.directory, config, self.embedding_dim, checkpoints.FIXED_ON_RESUME
        )
        self.best_record = self._intact_best_record() if self.chief else None
        self._build()
        self.latest = checkpoints.latest_intact_checkpoint(self.directory)
        if self.latest:
            self.checkpoint.restore(self.latest).assert_consumed()
            logging.info("Resuming from %s at step %d", self.latest, self.step.numpy())

    def _intact_best_record(self):
        """metrics.json of best_checkpoint, or None if there is none or it is
        damaged (then the next validated checkpoint replaces it)."""
        best = checkpoints.best_checkpoint(self.directory)
        if best is None:
            return None
        try:
            checkpoints.verify_checkpoint(best[0])
        except checkpoints.CheckpointError as error:
            logging.warning(
                "best_checkpoint unusable, %s; the next validated checkpoint "
                "replaces it",
                error,
            )
            return None
        return best[1]

    def _build(self):
        with self.strategy.scope() if self.strategy else contextlib.nullcontext():
            self.model = LEO(
                self.config.model, self.embedding_dim, seed=self.config.train.seed
            )
            self.optimizer = steps.make_optimizer(self.config.optimizer)
            self.optimizer.build(self.model.trainable_variables)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        # The checkpoint's own meta-validation accuracy; NaN if not validated.
        self.validation_accuracy = tf.Variable(math.nan, dtype=tf.float64)
        self.checkpoint = tf.train.Checkpoint(
            model=self.model,
            optimizer=self.optimizer,
            step=self.step,
            validation_accuracy=self.validation_accuracy,
        )

    def run(self):
        """Trains to num_steps_limit; returns a summary dict."""
        saving_directory = self._prepare_directory()
        try:
            return self._train(saving_directory)
        finally:
            if not self.chief:
                shutil.rmtree(saving_directory, ignore_errors=True)

    def _prepare_directory(self):
        """The directory checkpoints are saved to; writes config.json."""
        if not self.chief:
            # Multi-worker checkpointing: every worker saves, only the chief's
            # files are kept.
            return pathlib.Path(tempfile.mkdtemp(prefix="leo_tf_worker_"))
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise checkpoints.CheckpointError(
                f"--checkpoint_path={self.directory}: cannot be created ({error})"
            ) from error
        if not self.lock.held:
            self.lock.acquire()
            if checkpoints.checkpoint_prefixes(self.directory):
                raise checkpoints.CheckpointError(
                    f"--checkpoint_path={self.directory}: another trainer wrote "
                    "checkpoints there while this one was starting; rerun to "
                    "resume from them"
                )
        checkpoints.remove_stale_temporaries(self.directory)
        if self.latest:
            checkpoints.index_checkpoint(self.directory, self.latest)
        checkpoints.write_json_atomically(
            self.directory / checkpoints.CONFIG_FILE,
            {**self.config.to_dict(), "embedding_dim": self.embedding_dim},
        )
        if self.latest:
            self._promote_if_better(self.latest)
        return self.directory

    def _train(self, saving_directory):
        config = self.config
        self.manager = tf.train.CheckpointManager(
            self.checkpoint,
            str(saving_directory),
            max_to_keep=5,
            checkpoint_name=checkpoints.CHECKPOINT_PREFIX,
        )
        spec = self.train_sampler.element_spec
        train_step = steps.compile_train_step(
            self.model,
            self.optimizer,
            config.optimizer,
            spec,
            jit_compile=config.train.jit_compile,
            strategy=self.strategy,
            num_towers=runtime.num_towers(
                config.train.num_towers, config.data.metatrain_batch_size
            ),
        )
        self.evaluator = meta_eval.MetaEvaluator(
            self.model,
            self.val_sampler,
            jit_compile=config.train.jit_compile,
            num_towers=runtime.num_towers(
                config.train.num_towers, config.data.metavalid_batch_size
            ),
        )
        with self._writing_summaries():
            self.writer = (
                tf.summary.create_file_writer(str(self.directory))
                if self.chief
                else tf.summary.create_noop_writer()
            )
        first_step = int(self.step.numpy())
        limit = config.train.num_steps_limit
        if first_step >= limit:
            logging.info(
                "Step %d already reaches --num_steps_limit=%d", first_step, limit
            )
            return {"step": first_step}
        # Episodes' indices are sampled on request and gathered in TensorFlow,
        # noise is drawn ahead by tf.data: both are pure functions of
        # (seed, step).
        dataset = tf.data.Dataset.zip(
            episodes_lib.make_dataset(
                self.train_sampler, first_step, limit - first_step
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
        log = progress.TrainingLog(
            self.writer, self.model, first_step, limit, verbose=self.chief
        )
        outcome = {}
        with _StopRequest() as stop:
            for (step_tensor, episodes), noise in dataset:
                metrics = train_step(episodes, noise)
                step = int(step_tensor) + 1
                self.step.assign(step)
                log.add(metrics)
                if step == first_step + 1:
                    log.restart_clock(step)  # steps/s without the tracing time
                if step % config.train.summary_steps == 0 or step == limit:
                    with self._writing_summaries():
                        log.write(step)
                if step % config.train.checkpoint_steps == 0 or step == limit:
                    outcome = self._checkpoint_and_validate()
                if stop.signal:
                    logging.warning(
                        "%s received: saving step %d and stopping", stop.signal, step
                    )
                    self.validation_accuracy.assign(math.nan)
                    self._save()
                    outcome = {"stopped_by": stop.signal}
                    break
        with self._writing_summaries():
            self.writer.flush()
        logging.info(
            "Step %d: weights digest %s",
            self.step.numpy(),
            distribution.weights_digest(self.model),
        )
        return {"step": int(self.step.numpy()), **outcome}

    @contextlib.contextmanager
    def _writing_summaries(self):
        """Turns a failure to write TensorBoard summaries (disk full,
        read-only) into a CheckpointError naming the directory."""
        try:
            yield
        except (OSError, tf.errors.OpError) as error:
            raise checkpoints.CheckpointError(
                f"could not write TensorBoard summaries to {self.directory}: "
                f"{error}. The checkpoints ({self.manager.latest_checkpoint}) "
                "and best_checkpoint are intact; rerun to resume from them."
            ) from error

    def _save(self):
        """Saves a checkpoint unless the weights are non-finite; its prefix."""
        step = int(self.step.numpy())
        if not _finite(self.model):
            logging.error(
                "Refusing to checkpoint step %d: the weights are not finite. "
                "Keeping %s.",
                step,
                self.manager.latest_checkpoint,
            )
            return None
        try:
            return self.manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as error:
            checkpoints.remove_stale_temporaries(self.directory)  # ckpt-N_temp
            previous = self.manager.latest_checkpoint
            raise checkpoints.CheckpointError(
                f"could not write the checkpoint of step {step} to "
                f"{self.directory}: {error}. "
                + (
                    f"The previous checkpoints ({previous}) and best_checkpoint "
                    "are intact; rerun to resume from them."
                    if previous
                    else "No earlier checkpoint was written; rerun to start again."
                )
            ) from error

    def _checkpoint_and_validate(self):
        """Validates (chief), saves with the accuracy inside, promotes if best."""
        step = int(self.step.numpy())
        if not self.chief:
            self._save()
            return {}
        if not _finite(self.model):
            self._save()  # logs the refusal
            return {}
        num_batches = self.config.train.num_metavalid_batches
        accuracy, loss = _validate(
            self.evaluator,
            num_batches,
            0 if self.config.train.fixed_metavalid_batches else step * num_batches,
        )
        self.validation_accuracy.assign(accuracy)
        with self._writing_summaries(), self.writer.as_default(step=step):
            tf.summary.scalar("validation/accuracy", accuracy)
            tf.summary.scalar("validation/loss", loss)
            self.writer.flush()
        prefix = self._save()
        checkpoints.crash_point("save:done")
        is_best, best = self._beats_best(accuracy)
        logging.info(
            "Step %d: meta-validation accuracy %.4f (best %s)",
            step,
            accuracy,
            (
                "now"
                if is_best
                else f"{best['metavalid_accuracy']:.4f} at step {best['step']}"
            ),
        )
        if is_best and prefix:
            self._promote(prefix, _best_record(self.config, step, accuracy))
        return {"metavalid_accuracy": accuracy, "is_best": is_best}

    def _beats_best(self, accuracy):
        """(whether accuracy beats best_checkpoint's record, the record or None)."""
        best = self.best_record
        return best is None or accuracy > best["metavalid_accuracy"], best

    def _promote(self, prefix, record):
        checkpoints.promote_to_best(self.directory, prefix, record)
        self.best_record = record

    def _promote_if_better(self, prefix):
        """Promotes the restored latest checkpoint if its recorded validation
        accuracy beats the best record: the run died before promoting it."""
        accuracy = float(self.validation_accuracy.numpy())
        if math.isnan(accuracy):
            return
        if self._beats_best(accuracy)[0]:
            self._promote(
                prefix, _best_record(self.config, int(self.step.numpy()), accuracy)
            )
            logging.info(
                "Promoted %s (accuracy %.4f) to best_checkpoint", prefix, accuracy
            )


def train(config, strategy=None):
    """Meta-trains on config; returns {"step": ..., and the last validation}.

    Raises ConfigError, DataError or CheckpointError, naming the flag, file or
    directory, before anything is written when the inputs are unusable.
    """
    with checkpoints.RunLock(config.train.checkpoint_path) as lock:
        return _Session(config, strategy, lock).run()
