"""Preemption: SIGKILL at random moments and at exact crash points loses
nothing; SIGTERM and SIGINT checkpoint and exit cleanly."""

import json
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests import data_fixtures, run_fixtures

REPO = pathlib.Path(__file__).resolve().parents[1]
LIMIT = 300
CRASH_POINTS = ("save:done", "promote:staged", "promote:moved", "promote:linked")
NUM_RANDOM_KILLS = 3


def _command(data_path, directory, *extra):
    return [
        sys.executable,
        "-u",
        "-m",
        "leo_tf.train",
        f"--data_path={data_path}",
        f"--checkpoint_path={directory}",
        "--dataset_name=toy",
        "--num_latents=8",
        "--metatrain_batch_size=4",
        "--metavalid_batch_size=10",
        "--checkpoint_steps=5",
        "--summary_steps=1",
        f"--num_steps_limit={LIMIT}",
        "--dropout_rate=0.2",
        "--outer_lr=1e-3",
        *extra,
    ]


def _run_to_completion(data_path, directory, *extra):
    """Runs training to its end in a subprocess; returns the CompletedProcess."""
    process = subprocess.run(
        _command(data_path, directory, *extra),
        cwd=REPO,
        env=run_fixtures.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
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


def _launch(data_path, directory, crash_point=None):
    env = run_fixtures.subprocess_env(
        **({"LEO_TF_CRASH_AT": crash_point} if crash_point else {})
    )
    return subprocess.Popen(
        _command(data_path, directory),
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
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


def test_sigkill_at_random_moments_and_crash_points_loses_nothing(tmp_path, request):
    data_path = data_fixtures.write_toy_dataset(tmp_path / "data")
    directory = tmp_path / "run"
    straight = tmp_path / "straight"
    # The uninterrupted run to compare with, side by side with the kills (its
    # output goes to a file: an unread pipe would fill up and stall it).
    straight_log = tmp_path / "straight.log"
    with straight_log.open("w") as log:
        straight_process = subprocess.Popen(
            _command(data_path, straight),
            cwd=REPO,
            env=run_fixtures.subprocess_env(),
            text=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    request.addfinalizer(straight_process.kill)  # if the test fails before it ends
    rng = random.Random(0)
    schedule = [*CRASH_POINTS, *([None] * NUM_RANDOM_KILLS)]
    rng.shuffle(schedule)
    kills = 0
    best_accuracies = []
    for crash_point in schedule:
        expected_resume = tf.train.latest_checkpoint(str(directory))
        process = _launch(data_path, directory, crash_point)
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
    assert kills == len(schedule) == 7
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


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_checkpoint_and_exit_cleanly(tmp_path, signal_number):
    data_path = data_fixtures.write_toy_dataset(tmp_path / "data")
    directory = tmp_path / "run"
    process = subprocess.Popen(
        _command(data_path, directory, "--checkpoint_steps=1000"),
        cwd=REPO,
        env=run_fixtures.subprocess_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    for line in process.stdout:
        if line.startswith("step 3/"):
            break
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    name = signal.Signals(signal_number).name
    assert f"{name} received: saving step" in stderr
    prefix = tf.train.latest_checkpoint(str(directory))
    assert prefix is not None
    step = int(_value(tf.train.load_checkpoint(prefix), "step"))
    assert step >= 3 and prefix.endswith(f"ckpt-{step}")
    assert not (directory / ".lock").exists()  # released on the way out
    if signal_number != signal.SIGTERM:
        return  # resuming from a signal's checkpoint is checked once

    resumed = _run_to_completion(
        data_path, directory, "--checkpoint_steps=1000", f"--num_steps_limit={step + 2}"
    )
    assert f"Resuming from {prefix} at step {step}" in resumed.stderr
