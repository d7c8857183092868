"""Numerical faults and failing writes during training lose nothing."""

import logging
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from leo_tf import checkpoints, steps, trainer
from leo_tf import noise as noise_lib
from leo_tf.data import episodes as episodes_lib
from tests import run_fixtures

# Each test trains the toy run in process, faults injected: end to end.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_path(toy_data):
    """The shared toy data set (conftest), under this module's name for it."""
    return toy_data


def _nan_guard_count(directory):
    counts = {}
    for path in pathlib.Path(directory).glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == "train/nan_guard_count":
                    counts[event.step] = float(tf.make_ndarray(value.tensor))
    return counts


def _checkpoint_weights(prefix):
    reader = tf.train.load_checkpoint(str(prefix))
    return {
        n: reader.get_tensor(n)
        for n in reader.get_variable_to_shape_map()
        if n.startswith("model/")
    }


def _assert_all_checkpoints_finite(directory):
    prefixes = [
        p.with_suffix("") for p in pathlib.Path(directory).rglob("ckpt-*.index")
    ]
    assert prefixes
    for prefix in prefixes:
        for name, value in _checkpoint_weights(prefix).items():
            assert np.all(np.isfinite(value)), f"{prefix}: {name}"


def _inject_into_training_batches(monkeypatch, faults):
    """Makes the meta-training batches of the steps in `faults` carry
    faults[step] in the first three features of their first support example."""
    original = episodes_lib.make_dataset
    fault_steps = tf.constant(list(faults), tf.int64)
    fault_values = tf.constant(list(faults.values()), tf.float32)

    def poison(step, episodes):
        hit = tf.equal(fault_steps, step)
        value = tf.reduce_sum(tf.where(hit, fault_values, 0.0))
        positions = [[0, 0, 0, feature] for feature in range(3)]
        poisoned = tf.tensor_scatter_nd_update(
            episodes.tr_input, positions, tf.fill([3], value)
        )
        tr_input = tf.where(tf.reduce_any(hit), poisoned, episodes.tr_input)
        return step, episodes._replace(tr_input=tr_input)

    def make_dataset(sampler, *args, **kwargs):
        dataset = original(sampler, *args, **kwargs)
        if sampler.stream != 0:  # not the meta-training stream
            return dataset
        return dataset.map(poison)

    monkeypatch.setattr(episodes_lib, "make_dataset", make_dataset)


def test_nan_and_inf_embeddings_are_survived_via_the_guard(
    data_path, tmp_path, monkeypatch
):
    _inject_into_training_batches(monkeypatch, {6: np.nan, 13: np.inf})
    config = run_fixtures.toy_run_config(data_path, tmp_path / "run", summary_steps=5)

    outcome = trainer.train(config)

    assert outcome["step"] == 20
    counts = _nan_guard_count(tmp_path / "run")
    assert counts[5] == 0 and counts[10] == 1 and counts[20] == 2
    _assert_all_checkpoints_finite(tmp_path / "run")


def test_nan_loss_mid_run_is_counted_and_training_continues(
    data_path, tmp_path, monkeypatch
):
    original = noise_lib.noise_dataset

    def poisoned_noise_dataset(seed, first_step, *args, **kwargs):
        def poison(step, noise):
            factor = tf.where(tf.equal(step, 8), np.nan, 1.0)
            return noise._replace(query_dropout=noise.query_dropout * factor)

        dataset = original(seed, first_step, *args, **kwargs)
        return dataset.enumerate(start=first_step).map(poison)

    monkeypatch.setattr(noise_lib, "noise_dataset", poisoned_noise_dataset)
    config = run_fixtures.toy_run_config(data_path, tmp_path / "run", summary_steps=5)

    trainer.train(config)

    assert _nan_guard_count(tmp_path / "run") == {5: 0, 10: 1, 15: 1, 20: 1}
    _assert_all_checkpoints_finite(tmp_path / "run")


def test_non_finite_weights_are_never_checkpointed(
    data_path, tmp_path, monkeypatch, caplog
):
    compile_train_step = steps.compile_train_step

    def corrupting_compile(model, *args, **kwargs):
        step_fn = compile_train_step(model, *args, **kwargs)
        calls = []

        def step(episodes, noise):
            metrics = step_fn(episodes, noise)
            calls.append(1)
            if len(calls) == 15:
                kernel = model.decoder.kernel
                kernel.assign(tf.fill(kernel.shape, np.inf))
            return metrics

        return step

    monkeypatch.setattr(steps, "compile_train_step", corrupting_compile)
    config = run_fixtures.toy_run_config(data_path, tmp_path / "run")

    with caplog.at_level(logging.ERROR):
        trainer.train(config)

    directory = tmp_path / "run"
    assert tf.train.latest_checkpoint(str(directory)).endswith("ckpt-10")
    assert not (directory / "ckpt-20.index").exists()
    assert "Refusing to checkpoint step 20: the weights are not finite" in caplog.text
    assert checkpoints.best_metrics(directory)["step"] == 10
    _assert_all_checkpoints_finite(directory)


def test_failing_checkpoint_write_is_reported_keeps_everything_and_rerun_continues(
    data_path, tmp_path, monkeypatch
):
    directory = tmp_path / "run"
    config = run_fixtures.toy_run_config(data_path, directory, num_steps_limit=30)
    original_save = tf.train.CheckpointManager.save

    def failing_save(self, checkpoint_number=None, **kwargs):
        if checkpoint_number == 20:
            half_written = directory / "ckpt-20_temp" / "part-00000-of-00001"
            half_written.mkdir(parents=True)
            (half_written / "data-00000-of-00001").write_bytes(b"\0" * 100)
            raise OSError(28, "No space left on device")
        return original_save(self, checkpoint_number=checkpoint_number, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", failing_save)
    with pytest.raises(checkpoints.CheckpointError) as error:
        trainer.train(config)
    message = str(error.value)
    assert f"could not write the checkpoint of step 20 to {directory}" in message
    assert "No space left on device" in message
    assert "ckpt-10" in message and "rerun to resume" in message
    assert not (directory / "ckpt-20_temp").exists()
    before = _checkpoint_weights(directory / "ckpt-10")
    best_before = checkpoints.best_metrics(directory)
    assert best_before["step"] == 10

    monkeypatch.setattr(tf.train.CheckpointManager, "save", original_save)
    outcome = trainer.train(config)

    assert outcome["step"] == 30
    after = _checkpoint_weights(directory / "ckpt-10")
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
    assert tf.train.latest_checkpoint(str(directory)).endswith("ckpt-30")
    assert checkpoints.best_metrics(directory)["metavalid_accuracy"] >= (
        best_before["metavalid_accuracy"]
    )
