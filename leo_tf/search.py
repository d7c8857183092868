"""`python -m leo_tf.search`: random search of LEO's hyperparameters.

    python -m leo_tf.search --flagfile=flags/omniglot_5way1shot.cfg \\
        --data_path=DIR --search_dir=runs/search_5way1shot --num_trials=20

As in the paper, a random search that maximises meta-validation accuracy;
no trial is evaluated on the test split, which is read only to check that
it shares no class or example with the other splits (and, with
`--evaluate_best`, checked before the first trial and used after the search
to meta-test the winner). Every flag of `leo_tf.train` is accepted and sets
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
checkpoint; to run a finished trial again, delete its line. The rerun may
change the flags that change neither what a trial trains nor how it is
scored (trials.FREE_IN_A_SEARCH: summary_steps, data_path,
metatest_batch_size, num_metatest_episodes), e.g. to meta-test the best
trial on more episodes; the trials still to train and --evaluate_best use
the new values. Any other change is refused, naming the flag. SIGTERM or
SIGINT stop it after a checkpoint of the running trial (exit status 143 or
130). A trial whose training raises an error is recorded as failed with the
error, one that never reaches a finite meta-validation accuracy as diverged,
and the search goes on; errors of the data or of the directories stop it.

Trials are not stopped early (no successive halving): every trial trains
--num_steps_limit steps.

The options and the space are in leo_tf/search_space.py (no TensorFlow: bad
flags are reported before it loads), the trials in leo_tf/trials.py.
"""

import pathlib

from absl import flags

from leo_tf import cli
from leo_tf import config as config_lib
from leo_tf import search_space

PROG = "leo_tf.search"


def _base_args():
    """The parsed leo_tf.train flags of this command, as arguments."""
    return search_space.serialized(flags.FLAGS)


def _checked_space(options):
    """The Dimensions of --space; SearchError or ConfigError if the flags or
    the space are invalid."""
    if not options.search_dir:
        raise search_space.SearchError("--search_dir is required")
    if config_lib.values_of(config_lib.TrainConfig).evaluation_mode:
        raise search_space.SearchError(
            "--evaluation_mode: a search trains its trials; to meta-test the "
            "best one, add --evaluate_best to the search, or run `python -m "
            f"leo_tf.train --flagfile={options.search_dir}/best.cfg "
            "--evaluation_mode`"
        )
    config_lib.check(options)
    space = search_space.parse_space(options.space or search_space.DEFAULT_SPACE)
    search_space.check_space(_base_args(), space)
    return space


def main(argv):
    if len(argv) > 1:
        raise cli.Failure(f"unexpected arguments: {' '.join(argv[1:])}")
    options = config_lib.values_of(search_space.SearchOptions)
    with cli.reported(search_space.SearchError, config_lib.ConfigError):
        space = _checked_space(options)  # before TensorFlow is even imported
    # pylint: disable=g-import-not-at-top
    from leo_tf import checkpoints, evaluation, runtime, trials
    from leo_tf.data.embeddings import DataError

    # pylint: enable=g-import-not-at-top
    runtime.configure_threads()
    with cli.reported(
        search_space.SearchError,
        config_lib.ConfigError,
        DataError,
        checkpoints.CheckpointError,
    ):
        outcome = trials.run_search(
            _base_args(),
            space,
            options.search_dir,
            options.num_trials,
            flags.FLAGS.seed,
            evaluate_best=options.evaluate_best,
        )
        if outcome.stopped_by:
            raise cli.Stopped(outcome.stopped_by, outcome.stop_message)
        print(trials.results_table(outcome.results), flush=True)
        if outcome.best is None:
            raise search_space.SearchError(
                f"--search_dir={options.search_dir}: no trial succeeded; see "
                f"{trials.RESULTS_FILE}"
            )
        best_flagfile = pathlib.Path(options.search_dir) / trials.BEST_FLAGFILE
        print(
            f"Best: {outcome.best['directory']}, meta-validation accuracy "
            f"{outcome.best['metavalid_accuracy']:.4f}; flags in {best_flagfile}",
            flush=True,
        )
        if options.evaluate_best:
            config = trials.trial_config(
                best_flagfile, trials.free_flag_lines(_base_args())
            )
            results = evaluation.evaluate(config)
            print(evaluation.result_line(results), flush=True)


def run(argv=None):
    """Console entry point `leo-search`."""
    config_lib.define_flags()
    config_lib.define_flags_of([search_space.SearchOptions])
    cli.run(PROG, main, argv)


if __name__ == "__main__":
    run()
