"""The regression run's size check: int32 and memory refusals, naming flags."""

import dataclasses

import pytest

from leo_tf import config as options
from leo_tf.regression import config as config_lib
from leo_tf.regression import memory

GIB = 2**30


def _config(**overrides):
    return dataclasses.replace(config_lib.RegressionConfig(), **overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(metatrain_batch_size=10**6),
            "--metatrain_batch_size=1000000: the per-task parameters of a "
            "meta-training batch [A + M + 1, B, P] [12, 1000000, 1761] would have "
            "21,132,000,000 elements, more than TensorFlow's int32 limit of "
            "2,147,483,647; lower --metatrain_batch_size or --hidden_units",
        ),
        (
            dict(hidden_units=10**5),
            "--hidden_units=100000: the sampled parameters of an evaluation batch "
            "[S B, P] [1000, 10000400001] would have 10,000,400,001,000 elements",
        ),
        (
            dict(num_shots=10**8),
            "--num_shots=100000000: the regressor activations of an evaluation "
            "batch's support sets [S B, K, H] [1000, 100000000, 40] would have",
        ),
        (
            dict(num_eval_query_points=10**8),
            "--num_eval_query_points=100000000: the regressor activations of an "
            "evaluation batch [S B, Q, H] [1000, 100000000, 40] would have",
        ),
    ],
)
def test_a_tensor_beyond_int32_is_refused_naming_the_flag_that_grew(overrides, message):
    with pytest.raises(options.ConfigError) as error:
        memory.check_run(_config(**overrides))
    assert str(error.value).startswith(message), str(error.value)


def test_a_run_needing_more_memory_than_available_is_refused():
    """P = 1761 (H = 40): [12, B, P] float32, 6 copies, is 0.47 GiB for
    B = 1000; with the 1 GiB base and the rest, more than 1.4 GiB."""
    config = _config(metatrain_batch_size=1000)
    per_task = 12 * 1000 * 1761 * 4 * 6
    assert sum(t.bytes for t in memory.run_tensors(config)) > per_task
    with pytest.raises(options.ConfigError) as error:
        memory.check_run(config, available=(int(1.4 * GIB), "a test limit"))
    assert str(error.value).startswith("--metatrain_batch_size=1000: the run needs ")
    assert "more than the 1.4 GiB available (a test limit)" in str(error.value)
    memory.check_run(config, available=(2 * GIB, "a test limit"))


def test_evaluation_mode_counts_no_training_batch():
    config = _config(metatrain_batch_size=10**6, evaluation_mode=True)
    memory.check_run(config)  # the training batch does not exist
    names = [t.name for t in memory.run_tensors(config)]
    assert not any("meta-training" in name for name in names)
