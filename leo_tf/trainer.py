"""Meta-training and meta-test evaluation of LEO on a run directory.

`train` follows the authors' protocol: num_steps_limit meta-training steps;
every checkpoint_steps a checkpoint, a meta-validation estimate (the mean
accuracy of num_metavalid_batches fixed meta-validation batches) and, when it
is the best so far, an atomic promotion to `best_checkpoint`. A run restarted
on the same directory resumes from the latest checkpoint at exactly its step:
batches and noise are pure functions of (seed, step), so the data "state" is
the step itself.

`evaluate` restores the best checkpoint (else the latest), averages meta-test
accuracy over num_metatest_episodes episodes with a 95% interval, and writes
`test_results.json`.

Everything that can be wrong with flags, data or the directory is checked
before the first file is written.
"""

import dataclasses
import math
import pathlib
import signal
import time

import numpy as np
import tensorflow as tf
from absl import logging

from leo_tf import baseline, checkpoints, steps
from leo_tf.config import ConfigError
from leo_tf.data import episodes as episodes_lib
from leo_tf.data import meta_dataset
from leo_tf.model import LEO
from leo_tf.noise import draw_noise

# Configuration fields a checkpoint's variables depend on: resuming or
# evaluating with other values cannot work.
_ARCHITECTURE_FIELDS = ("num_latents",)


@dataclasses.dataclass
class _Run:
    """A model with its optimiser and the checkpoint that holds them."""

    model: LEO
    optimizer: object
    checkpoint: tf.train.Checkpoint
    step: tf.Variable  # completed meta-training steps
    validation_accuracy: tf.Variable  # of this checkpoint; NaN if unknown


def _build_run(config, embedding_dim):
    model = LEO(config.model, embedding_dim, seed=config.train.seed)
    optimizer = steps.make_optimizer(config.optimizer)
    optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    accuracy = tf.Variable(math.nan, dtype=tf.float64, trainable=False)
    checkpoint = tf.train.Checkpoint(
        model=model,
        optimizer=optimizer,
        step=step,
        validation_accuracy=accuracy,
    )
    return _Run(model, optimizer, checkpoint, step, accuracy)


def _check_compatible(directory, config, embedding_dim):
    """ConfigError if the directory's checkpoints were made for other shapes."""
    saved = checkpoints.read_json(pathlib.Path(directory) / checkpoints.CONFIG_FILE)
    if saved is None:
        return
    for name in _ARCHITECTURE_FIELDS:
        value = getattr(config.model, name)
        if saved["model"][name] != value:
            raise ConfigError(
                f"--{name}={value}: the checkpoints in {directory} were made "
                f"with {name}={saved['model'][name]}; use that value or "
                "another --checkpoint_path"
            )
    if saved["embedding_dim"] != embedding_dim:
        raise ConfigError(
            f"--dataset_name={config.data.dataset_name}: its embeddings are "
            f"{embedding_dim}-d, but the checkpoints in {directory} were made "
            f"for {saved['embedding_dim']}-d embeddings "
            f"({saved['data']['dataset_name']}); use another --checkpoint_path"
        )


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


class _TrainingLog:
    """Running means of the step metrics, summaries and the progress line."""

    _SCALARS = (
        "loss",
        "query_loss",
        "accuracy",
        "kl",
        "encoder_penalty",
        "l2",
        "orthogonality",
        "gradient_norm",
    )

    def __init__(self, writer, run, num_steps_limit):
        self.writer = writer
        self.run = run
        self.limit = num_steps_limit
        self.nan_guard_count = 0
        self._reset(run.step.numpy())

    def _reset(self, step):
        self.sums = {name: 0.0 for name in self._SCALARS}
        self.counts = {name: 0 for name in self._SCALARS}
        self.window_start = (step, time.perf_counter())

    def restart_clock(self, step):
        self.window_start = (step, time.perf_counter())

    def add(self, metrics):
        values = {name: float(getattr(metrics, name)) for name in self._SCALARS}
        for name, value in values.items():
            if math.isfinite(value):
                self.sums[name] += value
                self.counts[name] += 1
        self.nan_guard_count += int(metrics.nan_guard)
        self.last_latents = metrics.latents

    def write(self, step):
        """Writes the window's summaries and prints the progress line."""
        first_step, started = self.window_start
        elapsed = time.perf_counter() - started
        steps_per_second = (step - first_step) / elapsed if elapsed > 0 else 0.0
        means = {
            name: self.sums[name] / self.counts[name] if self.counts[name] else math.nan
            for name in self._SCALARS
        }
        model = self.run.model
        with self.writer.as_default(step=step):
            for name, value in means.items():
                tf.summary.scalar(f"train/{_SUMMARY_NAMES[name]}", value)
            tf.summary.scalar("train/nan_guard_count", self.nan_guard_count)
            tf.summary.scalar(
                "train/inner_lr_mean", tf.reduce_mean(model.inner_lr.value)
            )
            tf.summary.scalar(
                "train/finetuning_lr_mean", tf.reduce_mean(model.finetuning_lr.value)
            )
            tf.summary.scalar("train/steps_per_second", steps_per_second)
            tf.summary.histogram("train/latents", self.last_latents)
            tf.summary.histogram("train/inner_lr", model.inner_lr.value)
            tf.summary.histogram("train/finetuning_lr", model.finetuning_lr.value)
        eta = (self.limit - step) / steps_per_second if steps_per_second else math.nan
        print(
            f"step {step}/{self.limit} | loss {means['loss']:.4f} | "
            f"acc {means['accuracy']:.3f} | {steps_per_second:.1f} steps/s | "
            f"ETA {_duration(eta)}"
            + (f" | NaN guard x{self.nan_guard_count}" if self.nan_guard_count else ""),
            flush=True,
        )
        self._reset(step)


_SUMMARY_NAMES = {
    "loss": "loss",
    "query_loss": "query_loss",
    "accuracy": "accuracy",
    "kl": "kl",
    "encoder_penalty": "encoder_penalty",
    "l2": "l2_penalty",
    "orthogonality": "orthogonality_penalty",
    "gradient_norm": "gradient_norm",
}


def _duration(seconds):
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _noise_fn(config, episodes_spec):
    """(step, episodes) -> (episodes, noise): the step's noise, from its seed."""
    model = config.model
    support = episodes_spec.tr_input.shape.as_list()
    query = episodes_spec.val_input.shape.as_list()

    def add_noise(step, episodes):
        noise = draw_noise(
            tf.stack([tf.constant(config.train.seed, tf.int64), step]),
            support,
            query,
            num_latents=model.num_latents,
            inner_unroll_length=model.inner_unroll_length,
            finetuning_unroll_length=model.finetuning_unroll_length,
            dropout_rate=model.dropout_rate,
        )
        return step, episodes, noise

    return add_noise


def _validate(eval_step, sampler, num_batches):
    """Mean accuracy and query loss over the fixed meta-validation batches."""
    accuracies, losses = [], []
    for index in range(num_batches):
        accuracy, loss = eval_step(episodes_lib.Episodes(*sampler.sample(index)))
        accuracies.append(accuracy.numpy())
        losses.append(loss.numpy())
    return float(np.mean(accuracies)), float(np.mean(losses))


def train(config):
    """Meta-trains on config; returns the last validation metrics (a dict)."""
    directory = pathlib.Path(config.train.checkpoint_path)
    checkpoints.check_usable(directory, for_writing=True)
    train_classes = meta_dataset.load_classes(config.data, "train")
    val_classes = meta_dataset.load_classes(config.data, "val")
    embedding_dim = train_classes.embedding_dim
    if val_classes.embedding_dim != embedding_dim:
        raise ConfigError(
            f"--dataset_name={config.data.dataset_name}: train embeddings are "
            f"{embedding_dim}-d but val embeddings {val_classes.embedding_dim}-d"
        )
    seed = config.train.seed
    train_sampler = meta_dataset.train_sampler(config.data, train_classes, seed)
    val_sampler = meta_dataset.eval_sampler(config.data, val_classes, "val", seed)
    _check_compatible(directory, config, embedding_dim)

    run = _build_run(config, embedding_dim)
    manager = tf.train.CheckpointManager(
        run.checkpoint,
        str(directory),
        max_to_keep=5,
        checkpoint_name=checkpoints.CHECKPOINT_PREFIX,
    )
    if manager.latest_checkpoint:
        run.checkpoint.restore(manager.latest_checkpoint).assert_consumed()
        logging.info(
            "Resuming from %s at step %d", manager.latest_checkpoint, run.step.numpy()
        )
    # From here on the directory is written to.
    directory.mkdir(parents=True, exist_ok=True)
    checkpoints.remove_stale_temporaries(directory)
    checkpoints.write_json_atomically(
        directory / checkpoints.CONFIG_FILE,
        {**config.to_dict(), "embedding_dim": embedding_dim},
    )
    best = checkpoints.best_metrics(directory)
    if manager.latest_checkpoint:
        best = _promote_if_better(
            config, directory, manager.latest_checkpoint, run, best
        )

    spec = train_sampler.element_spec
    train_step = steps.compile_train_step(
        run.model,
        run.optimizer,
        config.optimizer,
        spec,
        jit_compile=config.train.jit_compile,
    )
    eval_step = steps.compile_eval_step(
        run.model, val_sampler.element_spec, jit_compile=config.train.jit_compile
    )
    writer = tf.summary.create_file_writer(str(directory))
    first_step = int(run.step.numpy())
    limit = config.train.num_steps_limit
    validation = {}
    if first_step >= limit:
        logging.info("Step %d already reaches --num_steps_limit=%d", first_step, limit)
        return {"step": first_step, "best": best}
    dataset = (
        episodes_lib.make_dataset(train_sampler, first_step, limit - first_step)
        .map(_noise_fn(config, spec))
        .prefetch(2)
    )
    log = _TrainingLog(writer, run, limit)
    with _StopRequest() as stop:
        for step_tensor, episodes, noise in dataset:
            metrics = train_step(episodes, noise)
            step = int(step_tensor) + 1
            run.step.assign(step)
            log.add(metrics)
            if step == first_step + 1:
                log.restart_clock(step)  # steps/s without the tracing time
            if step % config.train.summary_steps == 0 or step == limit:
                log.write(step)
            if step % config.train.checkpoint_steps == 0 or step == limit:
                validation = _checkpoint_and_validate(
                    config, directory, run, manager, eval_step, val_sampler, writer
                )
                if validation.get("is_best"):
                    best = validation
            if stop.signal:
                logging.warning(
                    "%s received: saving step %d and stopping", stop.signal, step
                )
                run.validation_accuracy.assign(math.nan)
                _save(run, manager, directory)
                writer.flush()
                return {"step": step, "stopped_by": stop.signal, "best": best}
    writer.flush()
    return {"step": int(run.step.numpy()), **validation, "best": best}


def _save(run, manager, directory):
    """Saves a checkpoint unless the weights are non-finite; returns its prefix."""
    step = int(run.step.numpy())
    if not _finite(run.model):
        logging.error(
            "Refusing to checkpoint step %d: the weights are not finite. "
            "Keeping %s.",
            step,
            manager.latest_checkpoint,
        )
        return None
    try:
        return manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as error:
        raise checkpoints.CheckpointError(
            f"could not write the checkpoint of step {step} to {directory}: "
            f"{error}. The previous checkpoints ({manager.latest_checkpoint}) "
            "and best_checkpoint are intact; rerun to resume from them."
        ) from error


def _checkpoint_and_validate(
    config, directory, run, manager, eval_step, val_sampler, writer
):
    """Validates, saves (with the accuracy inside) and promotes if best."""
    step = int(run.step.numpy())
    if not _finite(run.model):
        _save(run, manager, directory)  # logs the refusal
        return {}
    accuracy, loss = _validate(
        eval_step, val_sampler, config.train.num_metavalid_batches
    )
    run.validation_accuracy.assign(accuracy)
    with writer.as_default(step=step):
        tf.summary.scalar("validation/accuracy", accuracy)
        tf.summary.scalar("validation/loss", loss)
    writer.flush()
    prefix = _save(run, manager, directory)
    checkpoints.crash_point("save:done")
    best = checkpoints.best_metrics(directory)
    is_best = best is None or accuracy > best["metavalid_accuracy"]
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
        checkpoints.promote_to_best(
            directory, prefix, _best_record(config, step, accuracy)
        )
    return {"step": step, "metavalid_accuracy": accuracy, "is_best": is_best}


def _best_record(config, step, accuracy):
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


def _promote_if_better(config, directory, prefix, run, best):
    """Promotes the restored latest checkpoint if its recorded validation
    accuracy beats the best record: the run died before promoting it."""
    accuracy = float(run.validation_accuracy.numpy())
    step = int(run.step.numpy())
    if math.isnan(accuracy):
        return best
    if best is None or accuracy > best["metavalid_accuracy"]:
        record = _best_record(config, step, accuracy)
        checkpoints.promote_to_best(directory, prefix, record)
        logging.info("Promoted %s (accuracy %.4f) to best_checkpoint", prefix, accuracy)
        return record
    return best


def evaluate(config):
    """Meta-test evaluation of the best (else latest) checkpoint.

    Returns the test_results.json payload: accuracy and its 95% interval over
    num_metatest_episodes episodes (rounded down to whole batches), the
    nearest-class-mean baseline on the same episodes, and what was evaluated.
    """
    directory = pathlib.Path(config.train.checkpoint_path)
    checkpoints.check_usable(directory, for_writing=False)
    checkpoints.check_usable(directory, for_writing=True)
    prefix = checkpoints.best_checkpoint_prefix(directory)
    source = "best"
    if prefix is None:
        prefix = tf.train.latest_checkpoint(str(directory))
        source = "latest"
        if prefix is None:
            raise checkpoints.CheckpointError(
                f"--checkpoint_path={directory}: no checkpoint to evaluate "
                "(train first, or point at a training directory)"
            )
        logging.warning(
            "No best_checkpoint in %s: evaluating the latest checkpoint %s",
            directory,
            prefix,
        )
    test_classes = meta_dataset.load_classes(config.data, "test")
    embedding_dim = test_classes.embedding_dim
    _check_compatible(directory, config, embedding_dim)
    sampler = meta_dataset.eval_sampler(
        config.data, test_classes, "test", config.train.seed
    )
    model = LEO(config.model, embedding_dim)
    step = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, step=step)
    checkpoint.restore(prefix).expect_partial().assert_existing_objects_matched()
    eval_step = steps.compile_eval_step(
        model, sampler.element_spec, jit_compile=config.train.jit_compile
    )

    batch_size = config.data.metatest_batch_size
    num_batches = max(1, config.train.num_metatest_episodes // batch_size)
    accuracies, baselines = [], []
    dataset = episodes_lib.make_dataset(sampler, 0, num_batches, prefetch=1)
    for _, episodes in dataset:
        accuracy, _ = eval_step(episodes)
        accuracies.append(accuracy.numpy())
        baselines.append(
            baseline.nearest_class_mean_accuracy(
                episodes.tr_input, episodes.val_input, episodes.val_output
            )
        )
    accuracy, ci95 = baseline.mean_and_ci95(np.concatenate(accuracies))
    baseline_accuracy, baseline_ci95 = baseline.mean_and_ci95(np.concatenate(baselines))
    results = {
        "split": "test",
        "accuracy": accuracy,
        "ci95": ci95,
        "num_episodes": num_batches * batch_size,
        "checkpoint": str(prefix),
        "checkpoint_source": source,
        "step": int(step.numpy()),
        "dataset_name": config.data.dataset_name,
        "num_classes": config.data.num_classes,
        "num_tr_examples_per_class": config.data.num_tr_examples_per_class,
        "num_val_examples_per_class": sampler.num_val_examples_per_class,
        "baseline": "cosine nearest class mean",
        "baseline_accuracy": baseline_accuracy,
        "baseline_ci95": baseline_ci95,
    }
    checkpoints.write_json_atomically(directory / checkpoints.RESULTS_FILE, results)
    return results


def result_line(results):
    """The last line printed by evaluation: accuracy and 95% interval in %."""
    return (
        f"Meta-test accuracy {100 * results['accuracy']:.2f}% "
        f"+- {100 * results['ci95']:.2f}% (95% interval, "
        f"{results['num_episodes']} episodes, {results['num_classes']}-way "
        f"{results['num_tr_examples_per_class']}-shot, {results['dataset_name']}, "
        f"step {results['step']}); nearest-class-mean baseline "
        f"{100 * results['baseline_accuracy']:.2f}% "
        f"+- {100 * results['baseline_ci95']:.2f}%"
    )
