"""`python -m leo_tf.train --flagfile=flags/<name>.cfg`: train or evaluate LEO.

Meta-trains (and, with --evaluate_after_training, then evaluates), or with
--evaluation_mode only evaluates the best checkpoint under --checkpoint_path.
Flags: see `leo_tf/config.py` or `--helpfull`.
"""

from leo_tf import cli
from leo_tf import config as config_lib

PROG = "leo_tf.train"


def main(argv):
    if len(argv) > 1:
        raise cli.Failure(f"unexpected arguments: {' '.join(argv[1:])}")
    with cli.reported(config_lib.ConfigError):
        config = config_lib.from_flags()  # before TensorFlow is even imported
    # Imported here so that flag errors are reported at once.
    # pylint: disable=g-import-not-at-top
    from leo_tf import checkpoints, memory, runtime
    from leo_tf.data.embeddings import DataError

    # pylint: enable=g-import-not-at-top
    with cli.reported(config_lib.ConfigError, DataError, checkpoints.CheckpointError):
        memory.check_run(config)
        runtime.configure_threads()
        results = _run(config)
    if results is not None:
        from leo_tf import evaluation  # pylint: disable=g-import-not-at-top

        print(evaluation.result_line(results), flush=True)


def _run(config):
    """Trains and/or evaluates; the meta-test results, or None if not tested."""
    # pylint: disable=g-import-not-at-top
    from leo_tf import distribute, evaluation, stop_request, trainer

    # pylint: enable=g-import-not-at-top
    if config.train.evaluation_mode:
        return evaluation.evaluate(config)
    strategy = distribute.make_strategy(config.train.distribution)
    outcome = trainer.train(config, strategy)
    evaluates = config.train.evaluate_after_training and distribute.is_chief(strategy)
    finished = outcome["step"] >= config.train.num_steps_limit
    if "stopped_by" in outcome and (evaluates or not finished):
        raise cli.Stopped(
            outcome["stopped_by"],
            stop_request.training_stopped(
                outcome["step"],
                config.train.num_steps_limit,
                outcome["saved"],
                "the meta-test" if evaluates else None,
            ),
        )
    return evaluation.evaluate(config) if evaluates else None


def run(argv=None):
    """Console entry point `leo-train`."""
    config_lib.define_flags()
    cli.run(PROG, main, argv)


if __name__ == "__main__":
    run()
