"""`python -m leo_tf.search`: random search of LEO's hyperparameters.

    python -m leo_tf.search --flagfile=flags/omniglot_5way1shot.cfg \\
        --data_path=DIR --search_dir=runs/search_5way1shot --num_trials=20

As in the paper, a random search that maximises meta-validation accuracy;
the test split is never read (only `--evaluate_best`, after the search,
meta-tests the winner). Every flag of `leo_tf.train` is accepted and sets
the trials' common values; `--space` entries say which flags each trial
draws and how, one entry per flag:

    --space=outer_lr:loguniform:1e-4:1e-3     log-uniform in [LOW, HIGH)
    --space=dropout_rate:uniform:0:0.5        uniform in [LOW, HIGH)
    --space=inner_unroll_length:int:1:5       an integer in [LOW, HIGH]
    --space=num_latents:choice:16,32,64       one of the values

Any `leo_tf.train` flag can be searched, except the ones the search sets
itself (data_path, checkpoint_path, evaluation_mode,
evaluate_after_training). `--space` entries replace the default space, and,
like every flag, may be kept in a flagfile.

The default space: the six hyperparameters that the authors' repository
(github.com/deepmind/leo, README, "Hyperparameters") lists as the winners of
their random search on miniImageNet and tieredImageNet, 1- and 5-shot, each
over the decades that hold all four of the authors' winning values (given
in brackets); the dropout range also holds 0. The authors' code fixes the
others (num_latents 64, inner_lr_init 1, finetuning_lr_init 0.001; both
learning rates are meta-learned).

    outer_lr                      log-uniform [1e-4, 1e-3)   [2.7e-4, 8.7e-4]
    l2_penalty_weight             log-uniform [1e-10, 1e-8)  [1.7e-10, 8.5e-9]
    orthogonality_penalty_weight  log-uniform [1e-3, 1)      [1.5e-3, 0.19]
    dropout_rate                  uniform [0, 0.5)           [0.30, 0.48]
    kl_weight                     log-uniform [1e-3, 10)     [2.0e-3, 1.6]
    encoder_penalty_weight        log-uniform [1e-7, 1e-4)   [2.7e-7, 8.3e-5]

Trial i's values are drawn from a generator seeded with (--seed, i), so a
rerun draws the same ones; every trial also trains with --seed.

Layout under `--search_dir`:

    trial-<i>/trial.cfg     trial i's flags: all of leo_tf.train's, written
                            before it trains; `python -m leo_tf.train
                            --flagfile=<search_dir>/trial-<i>/trial.cfg`
                            reruns it alone
    trial-<i>/...           an ordinary leo_tf.train run directory
    results.jsonl           one JSON object per finished trial: its values,
                            status (ok, diverged or failed, with the reason),
                            best meta-validation accuracy and its step, steps,
                            wall time
    best.cfg                the best trial's trial.cfg so far
    events.out.tfevents.*   TensorBoard's HParams dashboard (the search space;
                            each trial's values are in its own directory):
                            tensorboard --logdir <search_dir>

Killed at any moment and rerun with the same command, the search keeps every
trial in results.jsonl and resumes the interrupted one from its latest
checkpoint; to run a finished trial again, delete its line. SIGTERM or
SIGINT stop it after a checkpoint of the running trial. A trial whose
training raises an error is recorded as failed with the error, one that
never reaches a finite meta-validation accuracy as diverged, and the search
goes on; errors of the data or of the directories stop it.

Trials are not stopped early (no successive halving): every trial trains
--num_steps_limit steps.
"""

import dataclasses
import json
import math
import os
import pathlib
import time

import keras
import numpy as np
import tensorflow as tf
from absl import flags, logging
from tensorboard.plugins.hparams import api as hp

from leo_tf import checkpoints, cli, evaluation, progress, runtime, trainer
from leo_tf import config as config_lib
from leo_tf.data import meta_dataset
from leo_tf.data.embeddings import DataError

KINDS = ("loguniform", "uniform", "int", "choice")
# Flags each trial's flagfile sets itself.
SEARCH_SET_FLAGS = (
    "data_path",
    "checkpoint_path",
    "evaluation_mode",
    "evaluate_after_training",
)
DEFAULT_SPACE = (
    "outer_lr:loguniform:1e-4:1e-3",
    "l2_penalty_weight:loguniform:1e-10:1e-8",
    "orthogonality_penalty_weight:loguniform:1e-3:1",
    "dropout_rate:uniform:0:0.5",
    "kl_weight:loguniform:1e-3:10",
    "encoder_penalty_weight:loguniform:1e-7:1e-4",
)
RESULTS_FILE = "results.jsonl"
BEST_FLAGFILE = "best.cfg"
TRIAL_FLAGFILE = "trial.cfg"
# TensorBoard: the search's objective, written in each trial's directory.
OBJECTIVE_TAG = "search/best_metavalid_accuracy"
_HPARAMS_SUFFIX = ".hparams"

PROG = "leo_tf.search"


class SearchError(ValueError):
    """Bad search flags or directory; the message names the flag or file."""


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """The search's own flags (beside every flag of leo_tf.train)."""

    search_dir: str = config_lib.option(
        None, "Directory of the search's trials and results."
    )
    num_trials: int = config_lib.option(
        20,
        "Trials to run (a rerun skips finished ones).",
        config_lib.at_least(1),
    )
    space: tuple = config_lib.option(
        None,
        "A searched flag, FLAG:loguniform:LOW:HIGH, FLAG:uniform:LOW:HIGH, "
        "FLAG:int:LOW:HIGH or FLAG:choice:V1,V2,...; repeat for each flag. "
        "Default: the authors' space (see the module docstring).",
        define=flags.DEFINE_multi_string,
    )
    evaluate_best: bool = config_lib.option(
        False, "After the search, meta-test the best trial only."
    )


# --- The search space ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched flag: how its value is drawn.

    low, high: bounds of loguniform, uniform (floats) and int (ints) draws.
    choices: the values of a choice, as flag text.
    """

    entry: str
    flag: str
    kind: str
    parser: object = dataclasses.field(compare=False, repr=False)
    low: float = None
    high: float = None
    choices: tuple = ()

    def draw(self, rng):
        """A value drawn with the numpy Generator `rng`, as flag text."""
        if self.kind == "loguniform":
            return repr(float(np.exp(rng.uniform(np.log(self.low), np.log(self.high)))))
        if self.kind == "uniform":
            return repr(float(rng.uniform(self.low, self.high)))
        if self.kind == "int":
            return str(int(rng.integers(self.low, self.high, endpoint=True)))
        return self.choices[int(rng.integers(len(self.choices)))]

    def value(self, text):
        """The Python value of the flag text `text`."""
        return self.parser.parse(text)

    def extremes(self):
        """Flag texts of the space's corner values, to validate up front."""
        if self.kind == "choice":
            return self.choices
        render = str if self.kind == "int" else repr
        return (render(self.low), render(self.high))

    def domain(self):
        """The HParams dashboard's domain of this dimension."""
        if self.kind == "int":
            return hp.IntInterval(self.low, self.high)
        if self.kind == "choice":
            return hp.Discrete([self.value(text) for text in self.choices])
        return hp.RealInterval(self.low, self.high)


def _train_flags():
    """A new FlagValues holding leo_tf.train's flags, at their defaults."""
    values = flags.FlagValues()
    config_lib.define_flags(values)
    return values


def parse_dimension(entry):
    """The Dimension of one --space entry; SearchError naming it if invalid."""

    def fail(problem):
        return SearchError(f"--space={entry}: {problem}")

    parts = entry.split(":")
    if len(parts) < 3:
        raise fail("expected FLAG:KIND:..., e.g. outer_lr:loguniform:1e-4:1e-3")
    name, kind, arguments = parts[0], parts[1], parts[2:]
    known = _train_flags()
    if name not in known:
        raise fail(f"{name} is not a flag of leo_tf.train")
    if name in SEARCH_SET_FLAGS:
        raise fail(f"--{name} is set by the search itself")
    if kind not in KINDS:
        raise fail(f"{kind} is not a kind of draw: use one of {', '.join(KINDS)}")
    parser = known[name].parser
    if kind == "choice":
        return Dimension(
            entry, name, kind, parser, choices=_choices(arguments, parser, fail)
        )
    allowed = _kinds_for(parser)
    if kind not in allowed:
        raise fail(f"--{name} can be searched by {', '.join(allowed)} only")
    if len(arguments) != 2:
        raise fail(f"{kind} takes LOW:HIGH")
    number = int if kind == "int" else float
    try:
        low, high = (number(text) for text in arguments)
    except ValueError:
        raise fail(
            f"LOW and HIGH must be {'integers' if kind == 'int' else 'numbers'}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise fail("needs finite LOW < HIGH")
    if kind == "loguniform" and low <= 0:
        raise fail("loguniform needs 0 < LOW")
    return Dimension(entry, name, kind, parser, low=low, high=high)


def _kinds_for(parser):
    """The kinds of draw a flag with this absl parser can take."""
    if isinstance(parser, flags.FloatParser):
        return ("loguniform", "uniform", "choice")
    if isinstance(parser, flags.IntegerParser):
        return ("int", "choice")
    return ("choice",)


def _choices(arguments, parser, fail):
    """The comma-separated values of a choice, each checked by the flag's parser."""
    texts = tuple(":".join(arguments).split(","))
    if any(not text for text in texts):
        raise fail("choice takes V1,V2,... with no empty value")
    for text in texts:
        try:
            parser.parse(text)
        except ValueError as error:
            raise fail(f"{text!r} is not a valid value ({error})") from None
    return texts


def parse_space(entries):
    """The Dimensions of --space entries, in order; SearchError if invalid."""
    space = tuple(parse_dimension(entry) for entry in entries)
    seen = set()
    for dimension in space:
        if dimension.flag in seen:
            raise SearchError(
                f"--space={dimension.entry}: --{dimension.flag} is searched twice"
            )
        seen.add(dimension.flag)
    return space


def draw_trial(space, seed, trial):
    """Trial `trial`'s values, {flag: text}: a pure function of its arguments."""
    rng = np.random.default_rng([seed, trial])
    return {dimension.flag: dimension.draw(rng) for dimension in space}


# --- Trial flagfiles ------------------------------------------------------------


def parse_train_flags(args):
    """leo_tf.train's flags parsed from `args` alone, in a new FlagValues.

    Args:
      args: command-line arguments, e.g. ["--flagfile=trial.cfg"].

    Returns:
      flags.FlagValues holding copies of leo_tf.train's flags; unset ones at
      their defaults.
    """
    values = _train_flags()
    try:
        values(["leo_tf.search", *args])
    except flags.Error as error:
        raise SearchError(str(error)) from None
    return values


def trial_config(flagfile):
    """The validated RunConfig of a trial's flagfile (ConfigError if invalid)."""
    return config_lib.from_flags(parse_train_flags([f"--flagfile={flagfile}"]))


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
        values["data_path"].value = os.path.abspath(values["data_path"].value)
    return _serialized(values)


def _serialized(values):
    """leo_tf.train's flags in `values` that have a value, as arguments."""
    return [
        values[name].serialize()
        for name in config_lib.train_flag_names()
        if values[name].value is not None
    ]


def _flag_lines(text):
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def _check_same_trial(path, lines):
    """SearchError unless the flagfile at `path`, if any, holds `lines`."""
    if not path.exists():
        return
    # In any order: flagfiles of earlier versions list the flags in another.
    saved = sorted(_flag_lines(path.read_text(encoding="utf-8")))
    lines = sorted(lines)
    if saved == lines:
        return
    difference = next(
        (f"{old} here, {new} now" for old, new in zip(saved, lines) if old != new),
        f"{len(saved)} flags here, {len(lines)} now",
    )
    raise SearchError(
        f"{path}: made by another search ({difference}); rerun the command that "
        "made it or use another --search_dir"
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
                str(record["trial"]),
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


def _write_hparams_config(search_dir, space):
    """The HParams dashboard's experiment: the space and the metrics (once)."""
    if _has_hparams_summary(search_dir):
        return
    writer = tf.summary.create_file_writer(
        str(search_dir), filename_suffix=_HPARAMS_SUFFIX
    )
    with writer.as_default():
        hp.hparams_config(
            hparams=[hp.HParam(d.flag, d.domain()) for d in space],
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


def _run_trial(trial, draws, space, directory, log):
    """Trains one trial (resuming it); returns its record, or None if stopped.

    Raises DataError or CheckpointError (they concern every trial).
    """
    hparams = {d.flag: d.value(draws[d.flag]) for d in space}
    started = time.perf_counter()
    record = {"trial": trial, "directory": directory.name, "hparams": hparams}
    try:
        config = trial_config(directory / TRIAL_FLAGFILE)
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
    if "stopped_by" in outcome:
        log(
            f"{directory.name}: stopped by {outcome['stopped_by']}; rerun the "
            "same command to resume"
        )
        return None
    record.update(steps=outcome["step"], wall_s=time.perf_counter() - started)
    best = checkpoints.best_metrics(directory)
    accuracy = best and best["metavalid_accuracy"]
    if accuracy is None or not math.isfinite(accuracy):
        reason = "no checkpoint with finite weights and meta-validation accuracy"
        return {**record, "status": "diverged", "reason": reason}
    _write_objective(directory, accuracy, best["step"])
    return {
        **record,
        "status": "ok",
        "metavalid_accuracy": accuracy,
        "best_step": best["step"],
    }


def _reason(error):
    """One line: the exception's type and its message's first line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


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


@dataclasses.dataclass
class SearchOutcome:
    results: dict  # {trial: record} of every finished trial
    best: dict  # the best ok record, or None
    stopped: bool  # a signal stopped the search before its last trial


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


def _check_search(base_args, space, num_trials):
    """SearchError, ConfigError or DataError if the flags or the space are
    unusable.

    The common flags are validated as a leo_tf.train run, then with each
    searched flag at its extremes (both bounds, or every choice).
    """
    config_lib.check(SearchOptions(num_trials=num_trials))
    config = config_lib.from_flags(parse_train_flags(base_args))
    meta_dataset.check_dataset_name(config.data)
    for dimension in space:
        for text in dimension.extremes():
            args = [*base_args, f"--{dimension.flag}={text}"]
            try:
                config_lib.from_flags(parse_train_flags(args))
            except (config_lib.ConfigError, SearchError) as error:
                raise SearchError(f"--space={dimension.entry}: {error}") from None


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


def _start_trial(trial, draws, directory, lines, header):
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


def run_search(base_args, space, search_dir, num_trials, seed, log=print):
    """Runs (or resumes) the search; returns a SearchOutcome.

    Args:
      base_args: leo_tf.train flags common to all trials, as command-line
        arguments (e.g. ["--flagfile=flags/omniglot_5way1shot.cfg", ...]).
      space: Dimensions (`parse_space`).
      search_dir: the search directory.
      num_trials: trials 0 .. num_trials - 1.
      seed: the draws' seed (the trials train with base_args' --seed).
      log: prints a line.

    Raises SearchError, ConfigError, DataError or CheckpointError, before
    any trial trains if the flags, space or directory are unusable.
    """
    search_dir = pathlib.Path(search_dir)
    _check_search_dir(search_dir)
    _check_search(base_args, space, num_trials)
    plan = _plan(base_args, space, search_dir, num_trials, seed)
    try:
        search_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SearchError(f"--search_dir={search_dir}: {error}") from None
    results = read_results(search_dir)
    _write_hparams_config(search_dir, space)
    best = _write_best(search_dir, results) if results else None
    started, durations = time.perf_counter(), []
    for trial, draws, directory, lines in plan:
        if trial in results:
            continue
        _start_trial(trial, draws, directory, lines, _trial_header(trial, seed, space))
        values = " ".join(f"--{name}={text}" for name, text in draws.items())
        log(f"{directory.name} ({trial + 1}/{num_trials}): {values}")
        record = _run_trial(trial, draws, space, directory, log)
        if record is None:
            return SearchOutcome(results, best, stopped=True)
        results[trial] = record
        _write_results(search_dir, results)
        best = _write_best(search_dir, results)
        durations.append(record["wall_s"])
        remaining = sum(1 for t, *_ in plan if t not in results)
        eta = remaining * sum(durations) / len(durations)
        elapsed = time.perf_counter() - started
        log(_progress_line(trial, num_trials, record, best, elapsed, eta))
    return SearchOutcome(results, best, stopped=False)


# --- Command line -------------------------------------------------------------------


def _base_args():
    """The parsed leo_tf.train flags of this command, as arguments."""
    return _serialized(flags.FLAGS)


def main(argv):
    if len(argv) > 1:
        raise cli.Failure(f"unexpected arguments: {' '.join(argv[1:])}")
    values = config_lib.values_of(SearchOptions)
    runtime.configure_threads()
    with cli.reported(
        SearchError, config_lib.ConfigError, DataError, checkpoints.CheckpointError
    ):
        if not values.search_dir:
            raise SearchError("--search_dir is required")
        space = parse_space(values.space or DEFAULT_SPACE)
        outcome = run_search(
            _base_args(),
            space,
            values.search_dir,
            values.num_trials,
            flags.FLAGS.seed,
        )
        if outcome.stopped:
            return
        print(results_table(outcome.results), flush=True)
        if outcome.best is None:
            raise SearchError(
                f"--search_dir={values.search_dir}: no trial succeeded; see "
                f"{RESULTS_FILE}"
            )
        best_flagfile = pathlib.Path(values.search_dir) / BEST_FLAGFILE
        print(
            f"Best: {outcome.best['directory']}, meta-validation accuracy "
            f"{outcome.best['metavalid_accuracy']:.4f}; flags in {best_flagfile}",
            flush=True,
        )
        if values.evaluate_best:
            results = evaluation.evaluate(trial_config(best_flagfile))
            print(evaluation.result_line(results), flush=True)


def run(argv=None):
    """Console entry point `leo-search`."""
    config_lib.define_flags()
    config_lib.define_flags_of([SearchOptions])
    cli.run(PROG, main, argv)


if __name__ == "__main__":
    run()
