"""Meta-training and held-out evaluation of LEO and MAML on few-shot regression.

Both models meta-train in one run, on the same task batches, each with its own
Adam (gradients NaN-guarded and clipped as in classification, leo_tf.steps).
The run directory (--checkpoint_path) holds:
  ckpt-<step>.*            tf.train.CheckpointManager checkpoints of both
                           models, both optimizers and the step; a restarted run
                           resumes from the latest at exactly its step, since
                           task batches and noise are pure functions of
                           (seed, step)
  config.json              the run's configuration
  events.out.tfevents.*    TensorBoard: train/* scalars every summary_steps;
                           validation/* scalars and validation/figure (the
                           paper-style figure) every checkpoint_steps
  regression_results.json  the held-out evaluation
  regression_figure.png    the paper-style figure (needs matplotlib)
"""

import dataclasses
import pathlib
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from leo_tf import baseline, checkpoints, steps, stop_request
from leo_tf.config import ConfigError
from leo_tf.regression import config as config_lib
from leo_tf.regression import figure as figure_lib
from leo_tf.regression import tasks as tasks_lib
from leo_tf.regression.maml import MAMLRegressor
from leo_tf.regression.model import LEORegressor, draw_noise, mean_squared_error

RESULTS_FILE = "regression_results.json"
FIGURE_FILE = "regression_figure.png"
_NUM_VALIDATION_TASKS = 100
_FIGURE_GRID_POINTS = 200
_SEED_SPEC = tf.TensorSpec([2], tf.int64)


class Models:
    """LEO, MAML, their optimizers and the step: what a checkpoint holds."""

    def __init__(self, config):
        self.leo = LEORegressor(config, seed=config.seed)
        self.maml = MAMLRegressor(config, seed=config.seed)
        self.leo_optimizer = _adam(config, self.leo)
        self.maml_optimizer = _adam(config, self.maml)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.checkpoint = tf.train.Checkpoint(
            leo=self.leo,
            maml=self.maml,
            leo_optimizer=self.leo_optimizer,
            maml_optimizer=self.maml_optimizer,
            step=self.step,
        )


def _adam(config, model):
    optimizer = keras.optimizers.Adam(learning_rate=config.outer_lr, epsilon=1e-8)
    # Slots created before restoring and tracing: restored, and traced once.
    optimizer.build(model.trainable_variables)
    return optimizer


def stateless_seed(config, stream, index):
    """The [2] seed of the noise of batch `index` of a stream (tasks.*_STREAM)."""
    return tf.constant([config.seed * tasks_lib.NUM_STREAMS + stream, index], tf.int64)


def _batch_spec(batch_size=None):
    """TensorSpecs of a tasks.Batch of batch_size tasks (None: any)."""
    spec = tf.TensorSpec([batch_size, None, 1], tf.float32)
    return tasks_lib.Batch(*([spec] * len(tasks_lib.Batch._fields)))


def _update(model, optimizer, config, objective, tape):
    """NaN guard, clipping and Adam on model; returns whether the guard fired."""
    variables = model.trainable_variables
    gradients = [
        tf.zeros_like(v) if g is None else g  # e.g. no finetuning steps
        for g, v in zip(tape.gradient(objective, variables), variables)
    ]
    gradients, fired = steps.nan_guarded_gradients(
        objective, gradients, variables, model.weight_matrices
    )
    gradients = steps.clip_gradients(
        gradients, config.gradient_threshold, config.gradient_norm_threshold
    )
    optimizer.apply_gradients(zip(gradients, variables))
    return fired


def make_train_step(config, models):
    """The compiled meta-training step of both models: (batch, seed) -> metrics."""
    leo, maml = models.leo, models.maml

    @tf.function(input_signature=[_batch_spec(config.metatrain_batch_size), _SEED_SPEC])
    def train_step(batch, seed):
        noise = draw_noise(config, config.metatrain_batch_size, seed)
        with tf.GradientTape() as tape:
            leo_objective, losses = leo.meta_loss(batch, noise)
        leo_nan = _update(leo, models.leo_optimizer, config, leo_objective, tape)
        with tf.GradientTape() as tape:
            maml_query_mse = tf.reduce_mean(maml.query_mse(batch))
        maml_nan = _update(maml, models.maml_optimizer, config, maml_query_mse, tape)
        return {
            "leo_loss": leo_objective,
            "leo_query_nll": tf.reduce_mean(losses.query_nll),
            "leo_query_mse": tf.reduce_mean(losses.query_mse),
            "leo_kl": tf.reduce_mean(losses.kl),
            "leo_encoder_penalty": tf.reduce_mean(losses.encoder_penalty),
            "leo_noise_stddev": leo.noise_stddev(),
            "leo_inner_lr_mean": tf.reduce_mean(leo.inner_lr),
            "leo_finetuning_lr_mean": tf.reduce_mean(leo.finetuning_lr),
            "maml_query_mse": maml_query_mse,
            "nan_guard": tf.cast(tf.logical_or(leo_nan, maml_nan), tf.float32),
        }

    return train_step


def make_predict_step(config, models):
    """The compiled predictions of both models for support sets and inputs.

    (support_x [B, K, 1], support_y [B, K, 1], inputs [B, M, 1], seed [2]) ->
    (LEO's deterministic prediction [B, M, 1], num_prediction_samples sampled
    LEO predictions [S, B, M, 1], MAML's prediction [B, M, 1]).
    """
    leo, maml = models.leo, models.maml
    spec = tf.TensorSpec([None, None, 1], tf.float32)

    @tf.function(input_signature=[spec, spec, spec, _SEED_SPEC])
    def predict(support_x, support_y, inputs, seed):
        mean_parameters = leo.adapt(support_x, support_y).parameters
        num_samples = config.num_prediction_samples * tf.shape(support_x)[0]
        samples = leo.sampled_predictions(
            support_x, support_y, inputs, draw_noise(config, num_samples, seed)
        )
        maml_parameters = maml.adapt(support_x, support_y)
        return (
            leo.predict(mean_parameters, inputs),
            samples,
            maml.predict(maml_parameters, inputs),
        )

    return predict


def _held_out_batch(config, stream, index, batch_size, num_query_points):
    rng = tasks_lib.task_rng(config.seed, stream, index)
    return tasks_lib.sample_batch(
        rng, batch_size, config.num_shots, num_query_points, config.noise_stddev
    )


def evaluate_tasks(
    config, models, predict, stream, num_tasks, num_query_points, after_batch=None
):
    """Per-task metrics of both models on held-out tasks of a stream.

    Returns a dict of [num_tasks] arrays: leo_mse and maml_mse (mean squared
    error against the noise-free function), leo_nll (negative log-likelihood
    of the noisy observations under the mixture of LEO's sampled predictions),
    leo_nll_of_mean (under LEO's deterministic prediction alone).
    after_batch, if given, is called after each batch with the number of
    tasks evaluated so far (at most num_tasks); an exception it raises ends
    the evaluation.
    """
    batch_size = min(num_tasks, config_lib.eval_batch_size(config))
    per_task = {"leo_mse": [], "maml_mse": [], "leo_nll": [], "leo_nll_of_mean": []}
    for index in range(-(-num_tasks // batch_size)):
        _, batch = _held_out_batch(config, stream, index, batch_size, num_query_points)
        leo_mean, samples, maml = predict(
            batch.support_x,
            batch.support_y,
            batch.query_x,
            stateless_seed(config, stream, index),
        )
        truth = tf.constant(batch.query_truth)
        per_task["leo_mse"].append(mean_squared_error(leo_mean, truth))
        per_task["maml_mse"].append(mean_squared_error(maml, truth))
        per_task["leo_nll"].append(models.leo.predictive_nll(samples, batch.query_y))
        per_task["leo_nll_of_mean"].append(
            models.leo.predictive_nll(leo_mean[None], batch.query_y)
        )
        if after_batch is not None:
            after_batch(min((index + 1) * batch_size, num_tasks))
    return {
        name: np.concatenate([v.numpy() for v in values])[:num_tasks]
        for name, values in per_task.items()
    }


def figure_png(config, models, predict, stream):
    """The paper-style figure of the first num_figure_tasks tasks of a stream.

    PNG bytes, or None when matplotlib is not installed.
    """
    if not figure_lib.available():
        return None
    batch_size = config_lib.eval_batch_size(config)
    tasks, batch = _held_out_batch(config, stream, 0, batch_size, 1)
    count = config.num_figure_tasks
    grid = np.linspace(*tasks_lib.X_RANGE, _FIGURE_GRID_POINTS)
    inputs = np.tile(grid[None, :, None], [count, 1, 1]).astype(np.float32)
    _, samples, maml = predict(
        batch.support_x[:count],
        batch.support_y[:count],
        inputs,
        stateless_seed(config, stream, 0),
    )
    return figure_lib.render_png(
        grid=grid,
        truth=tasks_lib.Tasks(*(field[:count] for field in tasks))(grid[None]),
        support_x=batch.support_x[:count, :, 0],
        support_y=batch.support_y[:count, :, 0],
        leo_samples=samples.numpy()[..., 0],
        maml=maml.numpy()[..., 0],
    )


def _check_compatible(directory, config, names):
    """The directory's saved configuration, or None for a new run directory.

    Raises ConfigError naming the fields `names` whose values differ from the
    saved ones (unless no checkpoint was made with them), or if the
    directory is leo_tf.train's; CheckpointError if it has checkpoints or
    other files but no configuration (checkpoints.check_unconfigured).
    """
    saved = checkpoints.read_json(directory / checkpoints.CONFIG_FILE)
    if saved is None:
        checkpoints.check_unconfigured(directory)
        return None
    if checkpoints.written_by(saved) == "leo_tf.train":
        raise ConfigError(
            f"--checkpoint_path={directory}: a leo_tf.train run directory (its "
            f"{checkpoints.CONFIG_FILE}), not a leo_tf.regression one; use "
            "another --checkpoint_path"
        )
    if checkpoints.checkpoint_prefixes(directory):
        current = {name: getattr(config, name) for name in names}
        checkpoints.check_unchanged(directory, saved, current)
    return saved


def _fixed_on_resume():
    """The fields a resumed training run must keep (all but FREE_ON_RESUME)."""
    return [
        field.name
        for field in dataclasses.fields(config_lib.RegressionConfig)
        if field.name not in config_lib.FREE_ON_RESUME
    ]


def _restore_latest(models, directory, remedy=checkpoints.RESUME_REMEDY):
    """Restores the latest intact checkpoint in directory; its prefix, or None.

    Damaged checkpoints are skipped for the next older one, with a warning
    naming each (checkpoints.latest_intact_checkpoint); CheckpointError,
    ending in `remedy`, if none is intact.
    """
    latest = checkpoints.latest_intact_checkpoint(directory, remedy)
    if latest is not None:
        models.checkpoint.restore(latest).assert_existing_objects_matched()
    return latest


class _Window:
    """Running means of the step metrics between two summaries."""

    def __init__(self, step):
        self.sums, self.count, self.start = {}, 0, (step, time.perf_counter())

    def add(self, metrics):
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.count += 1

    def means(self):
        return {name: total / self.count for name, total in self.sums.items()}

    def steps_per_second(self, step):
        first, started = self.start
        return (step - first) / max(time.perf_counter() - started, 1e-9)


def _write_summaries(writer, step, window, limit):
    means = window.means()
    speed = window.steps_per_second(step)
    with writer.as_default(step=step):
        for name, value in means.items():
            tf.summary.scalar(f"train/{name}", value)
        tf.summary.scalar("train/steps_per_second", speed)
    print(
        f"step {step}/{limit} | LEO query MSE {means['leo_query_mse']:.3f} "
        f"NLL {means['leo_query_nll']:.3f} | MAML query MSE "
        f"{means['maml_query_mse']:.3f} | {speed:.1f} steps/s",
        flush=True,
    )


def _validate(writer, step, config, models, predict):
    """validation/* scalars and the figure on held-out validation tasks
    (100, or num_eval_tasks if fewer)."""
    metrics = evaluate_tasks(
        config,
        models,
        predict,
        tasks_lib.VALIDATION_STREAM,
        min(_NUM_VALIDATION_TASKS, config.num_eval_tasks),
        config.num_eval_query_points,
    )
    png = figure_png(config, models, predict, tasks_lib.VALIDATION_STREAM)
    with writer.as_default(step=step):
        for name, values in metrics.items():
            tf.summary.scalar(f"validation/{name}", float(np.mean(values)))
        if png is not None:
            image = tf.image.decode_png(png, channels=4)
            tf.summary.image("validation/figure", image[None])


def train(config):
    """Meta-trains both models to num_steps_limit, resuming from the latest
    checkpoint under checkpoint_path.

    Returns {"step": the step reached}, with "stopped_by": the signal's name
    and "saved": True (its step is saved) if a SIGTERM or SIGINT stopped it.

    Holds the directory's lock (checkpoints.RunLock) throughout: a second
    trainer on it is refused, naming this one.
    """
    directory = pathlib.Path(config.checkpoint_path)
    checkpoints.check_usable(directory, for_writing=True)
    _check_compatible(directory, config, _fixed_on_resume())
    directory.mkdir(parents=True, exist_ok=True)
    with checkpoints.RunLock(directory) as lock:
        lock.acquire()
        return _train_holding_the_lock(config, directory)


def _train_holding_the_lock(config, directory):
    """train's work, once the lock on `directory` is held.

    config.json is written once the checkpoint to resume from (if any) is
    restored: a run that fails before leaves the directory's as it was.
    """
    models = Models(config)
    latest = _restore_latest(models, directory)
    checkpoints.check_newer_replaceable(directory, latest)
    checkpoints.write_json_atomically(
        directory / checkpoints.CONFIG_FILE, config.to_dict()
    )
    first, limit = int(models.step.numpy()), config.num_steps_limit
    if latest:
        # The index names the checkpoint resumed from, so that the manager
        # saves after it (and replaces a newer, damaged one).
        checkpoints.index_checkpoint(directory, latest)
        logging.info("Resuming from %s at step %d", latest, first)
    if first >= limit:
        logging.info("Step %d already reaches --num_steps_limit=%d", first, limit)
        return {"step": first}
    manager = tf.train.CheckpointManager(
        models.checkpoint,
        str(directory),
        max_to_keep=5,
        checkpoint_name=checkpoints.CHECKPOINT_PREFIX,
    )
    train_step = make_train_step(config, models)
    predict = make_predict_step(config, models)
    writer = tf.summary.create_file_writer(str(directory))
    window = _Window(first)
    outcome = {}
    with stop_request.StopRequest("training saves the current step and stops") as stop:
        for step in range(first, limit):
            _, batch = tasks_lib.sample_batch(
                tasks_lib.task_rng(config.seed, tasks_lib.TRAIN_STREAM, step),
                config.metatrain_batch_size,
                config.num_shots,
                config.num_query_points,
                config.noise_stddev,
            )
            window.add(
                train_step(batch, stateless_seed(config, tasks_lib.TRAIN_STREAM, step))
            )
            done = step + 1
            models.step.assign(done)
            if done % config.summary_steps == 0 or done == limit:
                with stop.output_closed_stops():
                    _write_summaries(writer, done, window, limit)
                window = _Window(done)
            checkpointed = done % config.checkpoint_steps == 0 or done == limit
            if checkpointed:
                # Validated before the save: a run killed in between redoes
                # both on resume, so TensorBoard misses no validation.
                _validate(writer, done, config, models, predict)
                writer.flush()
                checkpoints.save_checkpoint(manager, done)
                window = _Window(done)  # validation time is not training speed
            if stop.signal:
                logging.warning(
                    "%s received: %s step %d and stopping",
                    stop.signal,
                    "saved" if checkpointed else "saving",
                    done,
                )
                if not checkpointed:
                    checkpoints.save_checkpoint(manager, done)
                outcome = {"stopped_by": stop.signal, "saved": True}
                break
    writer.flush()
    return {"step": int(models.step.numpy()), **outcome}


def evaluate(config):
    """Evaluates the latest checkpoint on num_eval_tasks held-out tasks.

    Writes regression_results.json (and regression_figure.png, with
    matplotlib) under checkpoint_path; returns the results.
    """
    directory = pathlib.Path(config.checkpoint_path)
    checkpoints.check_usable(directory, for_writing=False)
    checkpoints.check_usable(
        directory, for_writing=True, writes=f"the evaluation writes {RESULTS_FILE}"
    )
    saved = _check_compatible(directory, config, config_lib.FIXED_FOR_EVALUATION)
    models = Models(config)
    latest = _restore_latest(models, directory, remedy="nothing to evaluate")
    if latest is None:
        raise checkpoints.CheckpointError(
            f"--checkpoint_path={directory}: no checkpoint to evaluate "
            "(train first, or point at a training directory)"
        )
    predict = make_predict_step(config, models)
    metrics = _held_out_metrics(config, models, predict)
    results = {"checkpoint": latest, "step": int(models.step.numpy())}
    for name, values in metrics.items():
        results.update(_mean_and_ci95(name, values))
    results.update(
        num_tasks=config.num_eval_tasks,
        num_shots=config.num_shots,
        seed=config.seed,
        num_query_points=config.num_eval_query_points,
        num_prediction_samples=config.num_prediction_samples,
        noise_stddev=config.noise_stddev,
        leo_learned_noise_stddev=_finite_or_none(models.leo.noise_stddev()),
        inner_unroll_length=config.inner_unroll_length,
        finetuning_unroll_length=config.finetuning_unroll_length,
        maml_inner_steps=config.maml_inner_steps,
        maml_order="second",
        training_task=_training_task(saved, config),
    )
    png = figure_png(config, models, predict, tasks_lib.TEST_STREAM)
    if png is None:
        logging.warning("matplotlib is not installed: no %s", FIGURE_FILE)
    else:
        checkpoints.write_file_atomically(directory / FIGURE_FILE, png)
    checkpoints.write_json_atomically(directory / RESULTS_FILE, results)
    return results


def _held_out_metrics(config, models, predict):
    """evaluate_tasks on the test stream, with a progress line; a SIGTERM or
    SIGINT stops it between batches (cli.Stopped), before anything is
    written."""
    with stop_request.stoppable_evaluation(
        "evaluation", config.num_eval_tasks, "tasks", RESULTS_FILE
    ) as after_batch:
        return evaluate_tasks(
            config,
            models,
            predict,
            tasks_lib.TEST_STREAM,
            config.num_eval_tasks,
            config.num_eval_query_points,
            after_batch,
        )


def _mean_and_ci95(name, values):
    """{name: mean, name_ci95: 95% interval} of per-task values; both None
    (JSON null), with a warning, if a task's value is not finite (a model
    that diverged on it)."""
    finite = np.isfinite(values)
    if finite.all():
        mean, ci95 = baseline.mean_and_ci95(values)
        return {name: mean, f"{name}_ci95": ci95}
    logging.warning(
        "%s is not finite on %d of %d held-out tasks: reported as null",
        name,
        int((~finite).sum()),
        len(values),
    )
    return {name: None, f"{name}_ci95": None}


def _finite_or_none(value):
    """A scalar as a float, or None (JSON null) if it is not finite."""
    value = float(value)
    return value if np.isfinite(value) else None


def _training_task(saved, config):
    """The task fields of the run's config.json (None if it has none),
    warning if they are not the evaluated ones."""
    if saved is None:
        return None
    trained = {name: saved.get(name) for name in config_lib.TASK_FIELDS}
    evaluated = {name: getattr(config, name) for name in config_lib.TASK_FIELDS}
    if trained != evaluated:
        logging.warning(
            "Evaluating with %s; the run was trained with %s", evaluated, trained
        )
    return trained


def result_line(results):
    """The one line that states the held-out results."""

    def figure(name):
        mean, ci95 = results[name], results[f"{name}_ci95"]
        return "not finite" if mean is None else f"{mean:.3f} ± {ci95:.3f}"

    samples = results["num_prediction_samples"]
    return (
        f"{results['num_shots']}-shot regression, {results['num_tasks']} held-out "
        f"tasks, step {results['step']}: MSE LEO {figure('leo_mse')}, MAML "
        f"{figure('maml_mse')}; LEO predictive NLL {figure('leo_nll')} "
        f"({samples} sample{'s' if samples != 1 else ''})"
    )
