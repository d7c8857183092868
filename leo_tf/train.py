"""`python -m leo_tf.train --flagfile=flags/<name>.cfg`: train or evaluate LEO.

Meta-trains (and, with --evaluate_after_training, then evaluates), or with
--evaluation_mode only evaluates the best checkpoint under --checkpoint_path.
Flags: see `leo_tf/config.py` or `--helpfull`.
"""

import sys

from absl import app, logging

from leo_tf import config as config_lib


def _fail(error):
    logging.flush()
    sys.exit(f"leo_tf.train: error: {error}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = config_lib.from_flags()
    except config_lib.ConfigError as error:
        _fail(error)  # before TensorFlow is even imported
    # Imported here so that flag errors are reported at once.
    # pylint: disable=g-import-not-at-top
    from leo_tf import checkpoints, distribution, evaluation, runtime, trainer
    from leo_tf.data.embeddings import DataError

    # pylint: enable=g-import-not-at-top
    runtime.configure_threads()
    try:
        if config.train.evaluation_mode:
            results = evaluation.evaluate(config)
        else:
            strategy = distribution.make_strategy(config.train.distribution)
            outcome = trainer.train(config, strategy)
            if (
                not config.train.evaluate_after_training
                or "stopped_by" in outcome
                or not distribution.is_chief(strategy)
            ):
                return
            results = evaluation.evaluate(config)
    except (config_lib.ConfigError, DataError, checkpoints.CheckpointError) as error:
        _fail(error)
    print(evaluation.result_line(results), flush=True)


def run():
    """Console entry point `leo-train`."""
    app.run(main)


if __name__ == "__main__":
    run()
