"""`python -m leo_tf.train --flagfile=flags/<name>.cfg`: train or evaluate LEO.

Meta-trains (and, with --evaluate_after_training, then evaluates), or with
--evaluation_mode only evaluates the best checkpoint under --checkpoint_path.
Flags: see `leo_tf/config.py` or `--helpfull`.
"""

import sys

from absl import app, logging

from leo_tf import checkpoints, config as config_lib, runtime, trainer
from leo_tf.data.embeddings import DataError

# What a user can fix: reported as one line, without a traceback.
_USER_ERRORS = (config_lib.ConfigError, DataError, checkpoints.CheckpointError)


def _evaluate_and_report(config):
    results = trainer.evaluate(config)
    print(trainer.result_line(results), flush=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = config_lib.from_flags()
        runtime.configure_threads()
        if config.train.evaluation_mode:
            _evaluate_and_report(config)
            return
        outcome = trainer.train(config)
        if config.train.evaluate_after_training and "stopped_by" not in outcome:
            _evaluate_and_report(config)
    except _USER_ERRORS as error:
        logging.flush()
        sys.exit(f"leo_tf.train: error: {error}")


def run():
    """Console entry point `leo-train`."""
    app.run(main)


if __name__ == "__main__":
    run()
