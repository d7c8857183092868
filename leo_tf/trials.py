"""The trials of `leo_tf.search`: each trained in turn, recorded, the best kept.

`run_search` writes each trial's flagfile, trains it as `leo_tf.train`
would (resuming an interrupted one), appends its record to results.jsonl,
copies the best trial's flagfile to best.cfg and writes TensorBoard's
HParams records; the layout under --search_dir is described in
leo_tf/search.py, the command line.
"""

import dataclasses
import json
import math
import os
import pathlib
import time

import keras
import tensorflow as tf
from absl import logging
from tensorboard.plugins.hparams import api as hp

from leo_tf import checkpoints, error_text, memory, progress, stop_request, trainer
from leo_tf import config as config_lib
from leo_tf.data import meta_dataset
from leo_tf.data.embeddings import DataError
from leo_tf.search_space import (
    SearchError,
    SearchOptions,
    check_space,
    draw_trial,
    parse_train_flags,
    serialized,
)

RESULTS_FILE = "results.jsonl"
BEST_FLAGFILE = "best.cfg"
TRIAL_FLAGFILE = "trial.cfg"
# TensorBoard: the search's objective, written in each trial's directory.
OBJECTIVE_TAG = "search/best_metavalid_accuracy"
_HPARAMS_SUFFIX = ".hparams"


# --- Trial flagfiles ------------------------------------------------------------


def trial_config(flagfile, overrides=()):
    """The validated RunConfig of a trial's flagfile (ConfigError if invalid),
    with `overrides` (flag arguments, e.g. free_flag_lines of this search's
    command) after it."""
    return config_lib.from_flags(
        parse_train_flags([f"--flagfile={flagfile}", *overrides])
    )


def trial_flag_lines(base_args, draws, directory):
    """A trial's flagfile lines: all of leo_tf.train's flags, one per line.

    Args:
      base_args: the search's leo_tf.train flags, as command-line arguments.
      draws: {flag: text}, the trial's drawn values.
      directory: the trial's run directory.
    """
    values = parse_train_flags(
        [*base_args, *(f"--{name}={text}" for name, text in draws.items())]
    )
    values["checkpoint_path"].value = str(pathlib.Path(directory).resolve())
    values["evaluation_mode"].value = False
    values["evaluate_after_training"].value = False
    if values["data_path"].value:
        values["data_path"].value = os.path.abspath(
            os.path.expanduser(values["data_path"].value)
        )
    return serialized(values)


# leo_tf.train flags that do not change what a trial trains or how it is
# scored: a rerun of the search may give them other values, which the
# trials still to train and --evaluate_best then use (the flagfiles keep the
# values they were written with). The other flags a training run may change
# on resume change a trial: its length and checkpoints (num_steps_limit,
# checkpoint_steps), its float rounding (num_towers, jit_compile); a search
# trains without a tf.distribute strategy.
FREE_IN_A_SEARCH = frozenset(
    {"summary_steps", "data_path", "metatest_batch_size", "num_metatest_episodes"}
)


def free_flag_lines(lines):
    """The lines (flag arguments) of `lines` that set flags FREE_IN_A_SEARCH."""
    return [line for line in lines if _flag_name(line) in FREE_IN_A_SEARCH]


def _relocate_trial(directory):
    """Points the flagfile of the trial in `directory`, if it has one, to the
    directory where it is now, if the search directory was moved or copied
    since it was written; the other lines stay as they were. Whether it was
    moved."""
    path = directory / TRIAL_FLAGFILE
    if not path.exists():
        return False
    here = f"--checkpoint_path={pathlib.Path(directory).resolve()}"
    lines = path.read_text(encoding="utf-8").splitlines()
    moved = [here if _flag_name(line) == "checkpoint_path" else line for line in lines]
    if moved == lines:
        return False
    checkpoints.write_text_atomically(path, "\n".join(moved) + "\n")
    return True


_TRAIN_FLAGS = frozenset(config_lib.train_flag_names())


def _flag_lines(text):
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def _flag_name(line):
    """The flag a flagfile line sets: "--seed=3" -> "seed", "--nojit_compile"
    -> "jit_compile"."""
    name = line.lstrip("-").split("=", 1)[0]
    if name.startswith("no") and name not in _TRAIN_FLAGS:
        return name[2:]
    return name


def _check_same_trial(path, lines):
    """SearchError unless the flagfile at `path`, if any, holds `lines` but
    for the flags FREE_IN_A_SEARCH and --checkpoint_path (the trial's own
    directory, wherever the search directory now is: `_relocate_trial`),
    naming the first flag that differs."""
    if not path.exists():
        return

    def fixed(flag_lines):
        # By name: flagfiles of earlier versions list the flags in another
        # order, and a boolean's line is --name or --noname.
        return {
            _flag_name(line): line
            for line in flag_lines
            if _flag_name(line) not in FREE_IN_A_SEARCH | {"checkpoint_path"}
        }

    saved = fixed(_flag_lines(path.read_text(encoding="utf-8")))
    current = fixed(lines)
    if saved == current:
        return
    name = next(n for n in sorted({*saved, *current}) if saved.get(n) != current.get(n))
    here, now = saved.get(name, f"no --{name}"), current.get(name, f"no --{name}")
    raise SearchError(
        f"{path}: made by another search ({here} here, {now} now); rerun the "
        "command that made it or use another --search_dir"
    )


# --- Results ----------------------------------------------------------------------


def read_results(search_dir):
    """{trial: record} of results.jsonl (empty if there is none)."""
    path = pathlib.Path(search_dir) / RESULTS_FILE
    if not path.exists():
        return {}
    results = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            results[int(record["trial"])] = record
        except (ValueError, KeyError, TypeError) as error:
            raise SearchError(
                f"{path}, line {number}: not a trial record ({error}); "
                "delete the line to rerun that trial"
            ) from None
    return results


def _write_results(search_dir, results):
    lines = [json.dumps(results[trial], sort_keys=True) for trial in sorted(results)]
    checkpoints.write_text_atomically(
        pathlib.Path(search_dir) / RESULTS_FILE, "\n".join(lines) + "\n"
    )


def ranked(results):
    """Trial records, best first: ok by accuracy, then diverged, then failed."""
    order = {"ok": 0, "diverged": 1, "failed": 2}

    def key(record):
        accuracy = record.get("metavalid_accuracy")
        return (order[record["status"]], -(accuracy or 0.0), record["trial"])

    return sorted(results.values(), key=key)


def results_table(results):
    """The trials as a text table, best first."""
    records = ranked(results)
    names = sorted({name for record in records for name in record["hparams"]})
    header = [
        "rank",
        "trial",
        "status",
        "metavalid",
        "best step",
        "steps",
        "wall",
        *names,
    ]
    rows = [header]
    for rank, record in enumerate(records, 1):
        accuracy = record.get("metavalid_accuracy")
        rows.append(
            [
                str(rank),
                record["directory"],
                record["status"],
                "-" if accuracy is None else f"{accuracy:.4f}",
                str(record.get("best_step") or "-"),
                str(record.get("steps") or "-"),
                progress.duration(record["wall_s"]),
                *(_short(record["hparams"].get(name)) for name in names),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        for row in rows
    ]
    for record in records:
        if record.get("reason"):
            lines.append(
                f"{record['directory']} {record['status']}: {record['reason']}"
            )
    return "\n".join(lines)


def _short(value):
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# --- TensorBoard HParams --------------------------------------------------------


def _has_hparams_summary(directory):
    return any(pathlib.Path(directory).glob(f"events.out.tfevents.*{_HPARAMS_SUFFIX}"))


def _domain(dimension):
    """The HParams dashboard's domain of a search_space.Dimension."""
    if dimension.kind == "int":
        return hp.IntInterval(dimension.low, dimension.high)
    if dimension.kind == "choice":
        return hp.Discrete([dimension.value(text) for text in dimension.choices])
    return hp.RealInterval(dimension.low, dimension.high)


def _write_hparams_config(search_dir, space):
    """The HParams dashboard's experiment: the space and the metrics (once)."""
    if _has_hparams_summary(search_dir):
        return
    writer = tf.summary.create_file_writer(
        str(search_dir), filename_suffix=_HPARAMS_SUFFIX
    )
    with writer.as_default():
        hp.hparams_config(
            hparams=[hp.HParam(d.flag, _domain(d)) for d in space],
            metrics=[
                hp.Metric(OBJECTIVE_TAG, display_name="best meta-validation accuracy"),
                hp.Metric(
                    "validation/accuracy", display_name="meta-validation accuracy"
                ),
            ],
        )
    writer.close()


def _write_trial_hparams(directory, trial, hparams):
    """The trial's values for the HParams dashboard (once)."""
    if _has_hparams_summary(directory):
        return
    writer = tf.summary.create_file_writer(
        str(directory), filename_suffix=_HPARAMS_SUFFIX
    )
    with writer.as_default():
        hp.hparams(hparams, trial_id=f"trial-{trial:03d}")
    writer.close()


def _write_objective(directory, accuracy, step):
    writer = tf.summary.create_file_writer(str(directory), filename_suffix=".search")
    with writer.as_default():
        tf.summary.scalar(OBJECTIVE_TAG, accuracy, step=step)
    writer.close()


# --- The search ------------------------------------------------------------------


def trial_directory(search_dir, trial):
    return pathlib.Path(search_dir) / f"trial-{trial:03d}"


def _trial_header(trial, seed, space):
    names = ", ".join(d.flag for d in space)
    return (
        f"# Trial {trial} of a leo_tf.search (--seed={seed}; searched: {names}).\n"
        f"# Rerun alone: python -m leo_tf.train --flagfile=<this file>\n"
    )


def _run_trial(trial, draws, space, directory, free_lines, log):
    """Trains one trial (resuming it), its flagfile with this command's
    `free_lines` (free_flag_lines) after it; returns its record.

    Raises DataError or CheckpointError (they concern every trial), or
    TrialStopped if a signal stopped it: before its last step (its
    checkpoint saved), or at it (the trial's record then goes with it).
    """
    hparams = {d.flag: d.value(draws[d.flag]) for d in space}
    started = time.perf_counter()
    record = {"trial": trial, "directory": directory.name, "hparams": hparams}
    try:
        config = trial_config(directory / TRIAL_FLAGFILE, free_lines)
    except config_lib.ConfigError as error:
        return {**record, "status": "failed", "reason": str(error), "wall_s": 0.0}
    resumed = checkpoints.indexed_checkpoint(directory)
    record["resumed_from_step"] = int(resumed.rsplit("-", 1)[1]) if resumed else 0
    _write_trial_hparams(directory, trial, hparams)
    try:
        outcome = trainer.train(config)
    except (DataError, checkpoints.CheckpointError):
        raise
    except Exception as error:  # pylint: disable=broad-except
        logging.exception("Trial %d failed", trial)
        wall = time.perf_counter() - started
        return {**record, "status": "failed", "reason": _reason(error), "wall_s": wall}
    finally:
        keras.backend.clear_session()
    signal_name = outcome.get("stopped_by")
    limit = config.train.num_steps_limit
    if signal_name and outcome["step"] < limit:
        log(
            f"{directory.name}: stopped by {signal_name}; rerun the same command to resume"
        )
        raise TrialStopped(
            signal_name,
            f"{directory.name}: "
            + stop_request.training_stopped(outcome["step"], limit, outcome["saved"]),
        )
    record.update(steps=outcome["step"], wall_s=time.perf_counter() - started)
    record.update(_scored(directory))
    if signal_name:
        raise TrialStopped(
            signal_name,
            f"{directory.name} finished and recorded; rerun the same command to "
            "go on with the search",
            record,
        )
    return record


def _scored(directory):
    """The status fields of a trained trial's record, from its best checkpoint."""
    best = checkpoints.best_metrics(directory)
    accuracy = best and best["metavalid_accuracy"]
    if accuracy is None or not math.isfinite(accuracy):
        reason = "no checkpoint with finite weights and meta-validation accuracy"
        return {"status": "diverged", "reason": reason}
    _write_objective(directory, accuracy, best["step"])
    return {
        "status": "ok",
        "metavalid_accuracy": accuracy,
        "best_step": best["step"],
    }


def _reason(error):
    """One line: the exception's type and what its message says went wrong."""
    return f"{type(error).__name__}: {error_text.summary(error)}"


def _write_best(search_dir, results):
    """Copies the best trial's flagfile to best.cfg; returns its record."""
    best = ranked(results)[0]
    if best["status"] != "ok":
        return None
    source = pathlib.Path(search_dir) / best["directory"] / TRIAL_FLAGFILE
    header = (
        f"# Best of {len(results)} finished trials of this search: "
        f"{best['directory']}, "
        f"meta-validation accuracy {best['metavalid_accuracy']:.4f} at step "
        f"{best['best_step']}.\n"
    )
    checkpoints.write_text_atomically(
        pathlib.Path(search_dir) / BEST_FLAGFILE,
        header + source.read_text(encoding="utf-8"),
    )
    return best


class TrialStopped(Exception):
    """A signal stopped a trial.

    signal_name: e.g. "SIGTERM"; message: what was saved and how to go on;
    record: the trial's record if it had finished, else None.
    """

    def __init__(self, signal_name, message, record=None):
        super().__init__(message)
        self.signal_name = signal_name
        self.message = message
        self.record = record


@dataclasses.dataclass
class SearchOutcome:
    results: dict  # {trial: record} of every finished trial
    best: dict  # the best ok record, or None
    stopped_by: str | None = None  # the signal that stopped the search, if one did
    stop_message: str | None = None  # what was saved then, and how to go on


def _progress_line(trial, num_trials, record, best, elapsed, eta):
    """A trial's result, the best so far, and the search's elapsed time and ETA."""
    if record["status"] == "ok":
        result = (
            f"meta-validation {record['metavalid_accuracy']:.4f} "
            f"(step {record['best_step']})"
        )
    else:
        result = record["reason"]
    best_so_far = (
        f"best {best['metavalid_accuracy']:.4f} ({best['directory']})"
        if best
        else "no best yet"
    )
    return (
        f"{record['directory']} ({trial + 1}/{num_trials}) {record['status']}: "
        f"{result} | {progress.duration(record['wall_s'])} | {best_so_far} | search "
        f"{progress.duration(elapsed)}, ETA {progress.duration(eta)}"
    )


def _check_search(base_args, space, num_trials, evaluate_best):
    """SearchError, ConfigError or DataError if the flags or the space are
    unusable: the common flags are validated as a leo_tf.train run, then with
    each searched flag at its extremes (search_space.check_space); with
    evaluate_best, the test split as that meta-test will read it."""
    config_lib.check(SearchOptions(num_trials=num_trials))
    config = check_space(base_args, space)
    meta_dataset.check_dataset_name(config.data)
    if evaluate_best:
        train = dataclasses.replace(config.train, evaluation_mode=True)
        memory.check_run(dataclasses.replace(config, train=train))


def _plan(base_args, space, search_dir, num_trials, seed):
    """[(trial, draws, directory, flagfile lines)]; SearchError if a trial
    directory holds another search's flagfile."""
    plan = []
    for trial in range(num_trials):
        draws = draw_trial(space, seed, trial)
        directory = trial_directory(search_dir, trial)
        lines = trial_flag_lines(base_args, draws, directory)
        _check_same_trial(directory / TRIAL_FLAGFILE, lines)
        plan.append((trial, draws, directory, lines))
    return plan


def _start_trial(directory, lines, header):
    """Makes the trial's directory and writes its flagfile, if not yet there."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TRIAL_FLAGFILE
    if not path.exists():
        checkpoints.write_text_atomically(path, header + "\n".join(lines) + "\n")


def _check_search_dir(search_dir):
    """SearchError if `search_dir` is a file or a training run's directory."""
    if search_dir.exists() and not search_dir.is_dir():
        raise SearchError(f"--search_dir={search_dir}: not a directory")
    if (search_dir / checkpoints.CONFIG_FILE).exists():
        raise SearchError(
            f"--search_dir={search_dir}: a leo_tf.train run directory (it holds "
            f"{checkpoints.CONFIG_FILE}); a search needs a directory of its own"
        )


def run_search(
    base_args, space, search_dir, num_trials, seed, log=print, evaluate_best=False
):
    """Runs (or resumes) the search; returns a SearchOutcome.

    Args:
      base_args: leo_tf.train flags common to all trials, as command-line
        arguments (e.g. ["--flagfile=flags/omniglot_5way1shot.cfg", ...]).
      space: Dimensions (`parse_space`).
      search_dir: the search directory.
      num_trials: trials 0 .. num_trials - 1.
      seed: the draws' seed (the trials train with base_args' --seed).
      log: prints a line.
      evaluate_best: the best trial will be meta-tested after the search:
        its test split is checked first.

    Raises SearchError, ConfigError, DataError or CheckpointError, before
    any trial trains if the flags, space or directory are unusable.
    """
    search_dir = pathlib.Path(search_dir)
    _check_search_dir(search_dir)
    _check_search(base_args, space, num_trials, evaluate_best)
    plan = _plan(base_args, space, search_dir, num_trials, seed)
    try:
        search_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SearchError(f"--search_dir={search_dir}: {error}") from None
    relocated = 0
    for _, _, directory, _ in plan:
        relocated += _relocate_trial(directory)
    if relocated:
        log(
            f"{search_dir} was moved or copied: the --checkpoint_path of "
            f"{relocated} trial flagfile(s) now names the trial here"
        )
    results = read_results(search_dir)
    beyond = sorted(trial for trial in results if trial >= num_trials)
    if beyond:
        log(
            f"{search_dir / RESULTS_FILE} also holds {len(beyond)} trial(s) beyond "
            f"--num_trials={num_trials} (up to "
            f"{trial_directory(search_dir, beyond[-1]).name}): they are ranked "
            "with the others"
        )
    _write_hparams_config(search_dir, space)
    best = _write_best(search_dir, results) if results else None
    started, durations = time.perf_counter(), []
    for trial, draws, directory, lines in plan:
        if trial in results:
            continue
        _start_trial(directory, lines, _trial_header(trial, seed, space))
        values = " ".join(f"--{name}={text}" for name, text in draws.items())
        log(f"{directory.name} ({trial + 1}/{num_trials}): {values}")
        stop = None
        try:
            record = _run_trial(
                trial, draws, space, directory, free_flag_lines(lines), log
            )
        except TrialStopped as stopped:
            stop, record = stopped, stopped.record
        if record is not None:
            results[trial] = record
            _write_results(search_dir, results)
            best = _write_best(search_dir, results)
        if stop is not None:
            return SearchOutcome(results, best, stop.signal_name, stop.message)
        durations.append(record["wall_s"])
        remaining = sum(1 for t, *_ in plan if t not in results)
        eta = remaining * sum(durations) / len(durations)
        elapsed = time.perf_counter() - started
        log(_progress_line(trial, num_trials, record, best, elapsed, eta))
    return SearchOutcome(results, best)
