"""`python -m leo_tf.regression`: few-shot regression with LEO and MAML.

    python -m leo_tf.regression --flagfile=flags/regression_5shot.cfg

Meta-trains LEO and the MAML baseline on few-shot regression (resuming from
the latest checkpoint under --checkpoint_path), then evaluates both on
held-out tasks; with --evaluation_mode, only evaluates. The last line printed
states both models' MSE and LEO's predictive NLL with 95% intervals.
Flags: the fields of `leo_tf.regression.config.RegressionConfig`.
"""

from absl import flags

from leo_tf import cli
from leo_tf import config as options
from leo_tf.regression import config as config_lib

PROG = "leo_tf.regression"


def define_flags(flag_values=flags.FLAGS):
    """One flag per RegressionConfig field: its name, type, default and help."""
    options.define_flags_of([config_lib.RegressionConfig], flag_values)


def config_from_flags(flag_values=flags.FLAGS):
    """The checked RegressionConfig of the parsed flags."""
    config = options.values_of(config_lib.RegressionConfig, flag_values)
    options.check(config)
    return config


def main(argv):
    if len(argv) > 1:
        raise cli.Failure(f"unexpected arguments: {' '.join(argv[1:])}")
    with cli.reported(options.ConfigError):
        config = config_from_flags()  # before TensorFlow is even imported
    # pylint: disable=g-import-not-at-top
    from leo_tf import checkpoints, runtime, stop_request
    from leo_tf.regression import memory, run

    # pylint: enable=g-import-not-at-top
    runtime.configure_threads()
    with cli.reported(options.ConfigError, checkpoints.CheckpointError):
        memory.check_run(config)
        if not config.evaluation_mode:
            outcome = run.train(config)
            if "stopped_by" in outcome:
                raise cli.Stopped(
                    outcome["stopped_by"],
                    stop_request.training_stopped(
                        outcome["step"],
                        config.num_steps_limit,
                        outcome["saved"],
                        "the evaluation",
                    ),
                )
        results = run.evaluate(config)
    print(run.result_line(results), flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(PROG, main)
