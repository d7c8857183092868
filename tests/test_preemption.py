"""Preemption loses nothing: SIGKILL at any moment, SIGTERM and SIGINT.

SIGKILL at random moments and at exact crash points loses nothing; SIGTERM
and SIGINT checkpoint and exit cleanly, or stop a meta-test before it writes.
"""

import json
import logging
import os
import pathlib
import random
import re
import signal
import time

import numpy as np
import pytest
import tensorflow as tf

from leo_tf import cli, evaluation, meta_eval, steps, train, trainer
from tests import run_fixtures

# Long enough for every kill to land before the end: the toy run's
# meta-validation accuracy sets 8 records (promotions) by step 115.
LIMIT = 120
CRASH_POINTS = ("save:done", "promote:staged", "promote:moved", "promote:linked")
NUM_RANDOM_KILLS = 1


def _flags(data_path, directory, *extra):
    """The toy run to LIMIT steps, small validations, checkpoints every 5."""
    return [
        *run_fixtures.toy_run_flags(
            data_path,
            directory,
            metavalid_batch_size=10,
            checkpoint_steps=5,
            summary_steps=1,
            num_steps_limit=LIMIT,
        ),
        *extra,
    ]


def _run_to_completion(data_path, directory, *extra):
    """Runs training to its end in a subprocess; returns the CompletedProcess."""
    process = run_fixtures.run_module(
        "leo_tf.train", *_flags(data_path, directory, *extra), timeout=600
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return process


def _value(reader, name):
    return reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")


def _check_best_checkpoint(directory):
    """best_checkpoint is loadable, finite, and metrics.json agrees with it."""
    link = directory / "best_checkpoint"
    if not link.exists():
        return None
    prefix = tf.train.latest_checkpoint(str(link))
    assert prefix is not None, "best_checkpoint has no checkpoint"
    reader = tf.train.load_checkpoint(prefix)
    metrics = json.loads((link / "metrics.json").read_text())
    assert pathlib.Path(prefix).name == f"ckpt-{metrics['step']}"
    assert _value(reader, "step") == metrics["step"]
    assert _value(reader, "validation_accuracy") == pytest.approx(
        metrics["metavalid_accuracy"]
    )
    for name in reader.get_variable_to_shape_map():
        if name.startswith("model/"):
            assert np.all(np.isfinite(reader.get_tensor(name))), name
    return metrics


def _launch(data_path, directory, *extra, crash_point=None):
    return run_fixtures.start_module(
        "leo_tf.train",
        *_flags(data_path, directory, *extra),
        env={"LEO_TF_CRASH_AT": crash_point} if crash_point else {},
    )


def _kill_after_progress(process, delay):
    """SIGKILLs `process` `delay` seconds after its first progress line."""
    for line in process.stdout:
        if line.startswith("step "):
            time.sleep(delay)
            break
    process.kill()
    _, stderr = process.communicate(timeout=60)
    return stderr


def _final_weights(directory):
    reader = tf.train.load_checkpoint(str(directory / f"ckpt-{LIMIT}"))
    return {
        n: reader.get_tensor(n)
        for n in reader.get_variable_to_shape_map()
        if n.startswith("model/")
    }


@pytest.mark.slow
def test_sigkill_at_random_moments_and_crash_points_loses_nothing(
    toy_data, tmp_path, request
):
    data_path = toy_data
    directory = tmp_path / "run"
    straight = tmp_path / "straight"
    # The uninterrupted run to compare with, side by side with the kills (its
    # output goes to a file: an unread pipe would fill up and stall it).
    straight_log = tmp_path / "straight.log"
    with straight_log.open("w") as log:
        straight_process = run_fixtures.start_module(
            "leo_tf.train", *_flags(data_path, straight), stdout=log, stderr=log
        )
    request.addfinalizer(straight_process.kill)  # if the test fails before it ends
    rng = random.Random(0)
    schedule = [*CRASH_POINTS, *([None] * NUM_RANDOM_KILLS)]
    rng.shuffle(schedule)
    kills = 0
    best_accuracies = []
    for crash_point in schedule:
        expected_resume = tf.train.latest_checkpoint(str(directory))
        process = _launch(data_path, directory, crash_point=crash_point)
        if crash_point:
            _, stderr = process.communicate(timeout=300)
        else:
            stderr = _kill_after_progress(process, rng.uniform(0.0, 0.8))
        assert process.returncode == -signal.SIGKILL, stderr[-3000:]
        kills += 1
        if expected_resume and "Resuming from" in stderr:
            assert f"Resuming from {expected_resume} at step" in stderr
        metrics = _check_best_checkpoint(directory)
        if metrics:
            best_accuracies.append(metrics["metavalid_accuracy"])

    expected_resume = tf.train.latest_checkpoint(str(directory))
    final = _run_to_completion(data_path, directory)
    assert f"Resuming from {expected_resume} at step" in final.stderr
    assert f"step {LIMIT}/{LIMIT}" in final.stdout
    assert kills == len(schedule) == len(CRASH_POINTS) + NUM_RANDOM_KILLS
    metrics = _check_best_checkpoint(directory)
    # The best-so-far record only ever improves across restarts.
    assert best_accuracies == sorted(best_accuracies)
    assert metrics["metavalid_accuracy"] >= max(best_accuracies, default=0)

    straight_process.wait(timeout=600)
    assert straight_process.returncode == 0, straight_log.read_text()[-3000:]
    interrupted_weights = _final_weights(directory)
    for name, value in _final_weights(straight).items():
        np.testing.assert_array_equal(interrupted_weights[name], value, err_msg=name)
    assert json.loads(
        (directory / "best_checkpoint" / "metrics.json").read_text()
    ) == json.loads((straight / "best_checkpoint" / "metrics.json").read_text())
    leftovers = [
        p.name for p in directory.iterdir() if ".tmp-" in p.name or "_temp" in p.name
    ]
    assert leftovers == []


def _signal_at_step(monkeypatch, signal_number, at_step):
    """Makes the compiled training step send this process `signal_number`
    right after its `at_step`-th call, as a preemption would."""
    compile_train_step = steps.compile_train_step

    def signalling_compile(*args, **kwargs):
        step_fn = compile_train_step(*args, **kwargs)
        calls = []

        def step(episodes, noise):
            metrics = step_fn(episodes, noise)
            calls.append(1)
            if len(calls) == at_step:
                os.kill(os.getpid(), signal_number)
            return metrics

        return step

    monkeypatch.setattr(steps, "compile_train_step", signalling_compile)


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_checkpoint_and_stop(
    toy_data, tmp_path, monkeypatch, caplog, signal_number
):
    """In process: the trainer's own handler saves the step and stops; a
    handler of the test's records a signal that reached past it."""
    directory = tmp_path / "run"
    config = run_fixtures.toy_run_config(
        toy_data, directory, num_steps_limit=LIMIT, checkpoint_steps=1000
    )
    _signal_at_step(monkeypatch, signal_number, at_step=3)
    unhandled = []
    previous = signal.signal(signal_number, lambda number, frame: unhandled.append(1))
    try:
        with caplog.at_level(logging.INFO):
            outcome = trainer.train(config)
    finally:
        signal.signal(signal_number, previous)
    assert unhandled == []
    name = signal.Signals(signal_number).name
    assert outcome == {"step": 3, "stopped_by": name, "saved": True}
    assert f"{name} received: saving step 3 and stopping" in caplog.text
    prefix = tf.train.latest_checkpoint(str(directory))
    assert prefix == str(directory / "ckpt-3")
    assert _value(tf.train.load_checkpoint(prefix), "step") == 3
    assert not (directory / ".lock").exists()  # released on the way out
    if signal_number != signal.SIGTERM:
        return  # resuming from a signal's checkpoint is checked once

    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = trainer.train(
            run_fixtures.toy_run_config(
                toy_data, directory, num_steps_limit=5, checkpoint_steps=1000
            )
        )
    assert f"Resuming from {prefix} at step 3" in caplog.text
    assert resumed["step"] == 5


def test_a_signal_at_a_checkpoint_step_keeps_that_checkpoint_and_its_accuracy(
    toy_data, tmp_path, monkeypatch, caplog
):
    """Step 10 is validated and saved when the signal is seen: it is not saved
    a second time (which would record its accuracy as NaN)."""
    directory = tmp_path / "run"
    config = run_fixtures.toy_run_config(toy_data, directory, checkpoint_steps=10)
    _signal_at_step(monkeypatch, signal.SIGTERM, at_step=10)
    with caplog.at_level(logging.INFO):
        outcome = trainer.train(config)
    assert outcome == {"step": 10, "stopped_by": "SIGTERM", "saved": True}
    assert "SIGTERM received: stopping after step 10" in caplog.text
    assert caplog.text.count("Step 10: meta-validation accuracy") == 1
    reader = tf.train.load_checkpoint(str(directory / "ckpt-10"))
    recorded = json.loads((directory / "best_checkpoint" / "metrics.json").read_text())
    assert _value(reader, "validation_accuracy") == pytest.approx(
        recorded["metavalid_accuracy"]
    )
    assert sorted(p.name for p in directory.glob("ckpt-*.index")) == ["ckpt-10.index"]


@pytest.mark.parametrize("evaluate_after_training", [False, True])
def test_a_signal_at_the_last_step_ends_a_finished_run_as_finished(
    toy_data, tmp_path, monkeypatch, evaluate_after_training
):
    """Training is complete: without a meta-test to run the command ends as
    usual (so `train && export` goes on); with one, it stops before it, saying
    so."""
    directory = tmp_path / "run"
    config = run_fixtures.toy_run_config(
        toy_data, directory, evaluate_after_training=evaluate_after_training
    )
    _signal_at_step(monkeypatch, signal.SIGINT, at_step=20)  # the last
    if not evaluate_after_training:
        assert train._run(config) is None
    else:
        with pytest.raises(cli.Stopped) as stopped:
            train._run(config)
        assert stopped.value.status == 130
        assert str(stopped.value) == (
            "SIGINT: training finished, checkpoint of step 20 of 20 saved; the "
            "meta-test did not run; rerun the same command to evaluate"
        )
        assert not (directory / "test_results.json").exists()
    assert tf.train.latest_checkpoint(str(directory)) == str(directory / "ckpt-20")


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_command_with_a_checkpoint_and_128_plus_its_number(
    toy_data, tmp_path, signal_number
):
    """The same, to the real command in a child process: it saves, says so
    in its last line, skips the meta-test and exits as the signal would."""
    directory = tmp_path / "run"
    process = _launch(
        toy_data,
        directory,
        "--checkpoint_steps=1000",
        "--evaluate_after_training",
    )
    for line in process.stdout:
        if line.startswith("step 3/"):
            break
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=120)
    name = signal.Signals(signal_number).name
    assert process.returncode == 128 + signal_number, stderr[-3000:]
    assert f"{name} received: saving step" in stderr
    prefix = tf.train.latest_checkpoint(str(directory))
    step = int(_value(tf.train.load_checkpoint(prefix), "step"))
    assert step >= 3 and prefix == str(directory / f"ckpt-{step}")
    assert stderr.strip().splitlines()[-1] == (
        f"leo_tf.train: stopped: {name}: checkpoint of step {step} of {LIMIT} "
        "saved; rerun the same command to resume; the meta-test did not run"
    )
    assert "Meta-test accuracy" not in stdout
    assert not (directory / ".lock").exists()


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_meta_test_between_batches_and_writes_nothing(
    toy_data, tmp_path, monkeypatch, signal_number
):
    """In process: the signal lands in the second of four batches; that batch
    finishes, the third never starts, test_results.json (an earlier one
    here) is untouched and the handlers in place before are restored."""
    directory = tmp_path / "run"
    config = run_fixtures.toy_run_config(toy_data, directory)  # 200 in batches of 50
    trainer.train(config)
    (directory / "test_results.json").write_text('{"accuracy": 0.5}')
    before = run_fixtures.snapshot(directory)
    evaluate_batch = meta_eval.MetaEvaluator.evaluate_batch
    evaluated = []

    def signalling_batch(self, step):
        evaluated.append(step)
        if step == 1:
            os.kill(os.getpid(), signal_number)
        return evaluate_batch(self, step)

    monkeypatch.setattr(meta_eval.MetaEvaluator, "evaluate_batch", signalling_batch)
    unhandled = []
    previous = signal.signal(signal_number, lambda number, frame: unhandled.append(1))
    try:
        with pytest.raises(cli.Stopped) as stopped:
            evaluation.evaluate(config)
        assert signal.getsignal(signal_number) is not previous
    finally:
        signal.signal(signal_number, previous)
    name = signal.Signals(signal_number).name
    assert evaluated == [0, 1] and unhandled == []
    assert stopped.value.status == 128 + signal_number
    assert str(stopped.value) == (
        f"{name}: the meta-test stopped after 100 of 200 episodes, before "
        "writing test_results.json; rerun the same command to evaluate"
    )
    assert run_fixtures.snapshot(directory) == before


def test_a_signal_in_the_last_meta_test_batch_lets_the_finished_meta_test_write(
    toy_data, tmp_path, monkeypatch
):
    directory = tmp_path / "run"
    config = run_fixtures.toy_run_config(toy_data, directory)  # 200 in batches of 50
    trainer.train(config)
    evaluate_batch = meta_eval.MetaEvaluator.evaluate_batch

    def signalling_batch(self, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate_batch(self, step)

    monkeypatch.setattr(meta_eval.MetaEvaluator, "evaluate_batch", signalling_batch)
    results = evaluation.evaluate(config)
    assert results["num_episodes"] == 200
    written = json.loads((directory / "test_results.json").read_text())
    assert written["accuracy"] == results["accuracy"]


@pytest.mark.slow
def test_ctrl_c_in_a_long_meta_test_after_training_ends_with_its_stopped_line(
    toy_data, tmp_path
):
    """The real command: a meta-test longer than ten seconds prints progress;
    Ctrl-C then ends the command with 130 and a line saying what to do,
    training's checkpoint kept and no test_results.json."""
    directory = tmp_path / "run"
    total = 10**7
    process = run_fixtures.start_module(
        "leo_tf.train",
        *run_fixtures.toy_run_flags(toy_data, directory, num_metatest_episodes=total),
        "--evaluate_after_training",
    )
    progress_line = None
    for line in process.stdout:
        if line.startswith("meta-test "):
            progress_line = line
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert re.fullmatch(
        rf"meta-test \d+/{total} episodes \| [\d.]+ episodes/s \| ETA \S+\n",
        progress_line,
    )
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"leo_tf\.train: stopped: SIGINT: the meta-test stopped after \d+ of "
        rf"{total} episodes, before writing test_results\.json; rerun the same "
        "command to evaluate",
        last,
    ), last
    assert tf.train.latest_checkpoint(str(directory)).endswith("ckpt-20")
    assert not (directory / "test_results.json").exists()
