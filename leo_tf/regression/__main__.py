"""`python -m leo_tf.regression --flagfile=flags/regression_5shot.cfg`.

Meta-trains LEO and the MAML baseline on few-shot regression (resuming from
the latest checkpoint under --checkpoint_path), then evaluates both on
held-out tasks; with --evaluation_mode, only evaluates. The last line printed
states both models' MSE and LEO's predictive NLL with 95% intervals.
Flags: the fields of `leo_tf.regression.config.RegressionConfig`.
"""

import dataclasses
import sys

from absl import app, flags, logging

from leo_tf.regression import config as config_lib

_DEFINE = {
    bool: flags.DEFINE_boolean,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    str: flags.DEFINE_string,
}


def define_flags(flag_values=flags.FLAGS):
    """One flag per RegressionConfig field: its name, type, default and help."""
    for field in dataclasses.fields(config_lib.RegressionConfig):
        _DEFINE[field.type](
            field.name,
            field.default,
            config_lib.help_text(field),
            flag_values=flag_values,
        )


def config_from_flags(flag_values=flags.FLAGS):
    """The validated RegressionConfig of the parsed flags."""
    config = config_lib.RegressionConfig(
        **{
            field.name: flag_values[field.name].value
            for field in dataclasses.fields(config_lib.RegressionConfig)
        }
    )
    config_lib.validate(config)
    return config


def _fail(error):
    logging.flush()
    sys.exit(f"leo_tf.regression: error: {error}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = config_from_flags()
    except config_lib.ConfigError as error:
        _fail(error)  # before TensorFlow is even imported
    # pylint: disable=g-import-not-at-top
    from leo_tf import checkpoints, runtime
    from leo_tf.regression import run

    # pylint: enable=g-import-not-at-top
    runtime.configure_threads()
    try:
        if not config.evaluation_mode:
            run.train(config)
        results = run.evaluate(config)
    except (config_lib.ConfigError, checkpoints.CheckpointError) as error:
        _fail(error)
    print(run.result_line(results), flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
