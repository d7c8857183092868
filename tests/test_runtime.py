"""The process-wide TensorFlow settings of leo_tf.runtime."""

import pytest
import tensorflow as tf

from leo_tf import runtime
from tests import run_fixtures


def test_automatic_towers_are_a_divisor_of_the_batch_up_to_the_cores(monkeypatch):
    monkeypatch.setattr(runtime, "_cores", lambda: 4)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: [])
    assert runtime.num_towers(0, 12) == 4
    assert runtime.num_towers(0, 200) == 4
    assert runtime.num_towers(0, 6) == 3  # 4 does not divide 6
    assert runtime.num_towers(0, 7) == 1
    assert runtime.num_towers(0, 2) == 2
    assert runtime.num_towers(3, 12) == 3  # an explicit request is kept


def test_one_tower_when_a_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(runtime, "_cores", lambda: 16)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: ["gpu:0"])
    assert runtime.num_towers(0, 12) == 1


def _onednn_enabled_after_importing_leo_tf_then_tensorflow(environment_value):
    """Whether TensorFlow runs oneDNN kernels in a fresh process."""
    script = (
        "import leo_tf, tensorflow\n"
        "from tensorflow.python.util import _pywrap_util_port\n"
        "print(_pywrap_util_port.IsMklEnabled())\n"
    )
    process = run_fixtures.run_python(
        script, env={"TF_ENABLE_ONEDNN_OPTS": environment_value}, check=True
    )
    return process.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.slow
@pytest.mark.parametrize(
    "environment_value, expected", [(None, True), ("0", False), ("1", True)]
)
def test_leo_tf_turns_on_onednn_kernels_unless_the_user_chose(
    environment_value, expected
):
    assert (
        _onednn_enabled_after_importing_leo_tf_then_tensorflow(environment_value)
        == expected
    )
