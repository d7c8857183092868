"""Process-wide TensorFlow settings."""

import tensorflow as tf

from leo_tf import runtime


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
