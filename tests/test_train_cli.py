"""End to end: `python -m leo_tf.train` in a subprocess on small data."""

import concurrent.futures
import json
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests import run_fixtures


def _flags(data_path, directory, *extra):
    """The toy run's flags with summaries every 5 steps and the command's
    default 10,000-episode meta-test, then `extra`."""
    return [
        *run_fixtures.toy_run_flags(
            data_path,
            directory,
            summary_steps=5,
            metatest_batch_size=500,
            num_metatest_episodes=10000,
        ),
        *extra,
    ]


def run_cli(*args, check=True):
    """Runs the training CLI; returns the CompletedProcess (text)."""
    process = run_fixtures.run_module("leo_tf.train", *args)
    if check and process.returncode != 0:
        raise AssertionError(
            f"exit {process.returncode}\n{process.stdout}\n{process.stderr}"
        )
    return process


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory):
    """A 20-step run, then the same run resumed to 30 steps."""
    directory = tmp_path_factory.mktemp("run") / "leo"
    common = _flags(toy_data, directory)
    first = run_cli(*common, "--num_steps_limit=20")
    second = run_cli(*common, "--num_steps_limit=30")
    return directory, common, first, second


def _scalars(directory):
    """{tag: {step: value}} from the run's TensorBoard event files."""
    values = {}
    for path in directory.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    number = float(tf.make_ndarray(value.tensor))
                    values.setdefault(value.tag, {})[event.step] = number
    return values


def _histogram_tags(directory):
    tags = set()
    for path in directory.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "histograms":
                    tags.add(value.tag)
    return tags


@pytest.mark.slow
def test_training_writes_checkpoints_events_and_best_metrics(trained):
    directory, _, first, _ = trained
    assert sorted(p.name for p in directory.glob("ckpt-*.index")) == [
        "ckpt-10.index",
        "ckpt-20.index",
        "ckpt-30.index",
    ]
    metrics = json.loads((directory / "best_checkpoint" / "metrics.json").read_text())
    assert set(metrics) >= {"step", "metavalid_accuracy", "checkpoint"}
    assert metrics["checkpoint"] == f"ckpt-{metrics['step']}"
    assert (directory / "best_checkpoint" / f"ckpt-{metrics['step']}.index").exists()
    validation = _scalars(directory)["validation/accuracy"]
    assert set(validation) == {10, 20, 30}
    # The best checkpoint is the one with the highest validation accuracy.
    best_step = max(validation, key=validation.get)
    assert metrics["step"] == best_step
    assert metrics["metavalid_accuracy"] == pytest.approx(validation[best_step])
    assert "step 20/20 | loss" in first.stdout


@pytest.mark.slow
def test_tensorboard_has_the_named_scalars_and_histograms(trained):
    directory = trained[0]
    scalars = _scalars(directory)
    for tag in (
        "train/loss",
        "train/accuracy",
        "train/kl",
        "train/encoder_penalty",
        "train/l2_penalty",
        "train/orthogonality_penalty",
        "train/gradient_norm",
        "train/nan_guard_count",
        "train/inner_lr_mean",
        "train/finetuning_lr_mean",
        "train/steps_per_second",
        "validation/accuracy",
    ):
        assert tag in scalars, tag
    assert set(scalars["train/loss"]) == {5, 10, 15, 20, 25, 30}
    assert scalars["train/inner_lr_mean"][5] != 1.0  # it is trained
    assert _histogram_tags(directory) >= {
        "train/latents",
        "train/inner_lr",
        "train/finetuning_lr",
    }


@pytest.mark.slow
def test_second_invocation_resumes_at_the_saved_step(trained):
    directory, _, _, second = trained
    assert "Resuming from" in second.stderr and "at step 20" in second.stderr
    assert "step 25/30" in second.stdout and "step 5/30" not in second.stdout
    reader = tf.train.load_checkpoint(str(directory / "ckpt-30"))
    assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 30


@pytest.mark.slow
def test_interrupted_run_equals_an_uninterrupted_one(trained, tmp_path):
    directory, common, _, _ = trained
    straight = tmp_path / "straight"
    args = [a for a in common if not a.startswith("--checkpoint_path")]
    run_cli(*args, f"--checkpoint_path={straight}", "--num_steps_limit=30")
    resumed = tf.train.load_checkpoint(str(directory / "ckpt-30"))
    uninterrupted = tf.train.load_checkpoint(str(straight / "ckpt-30"))
    names = [n for n in resumed.get_variable_to_shape_map() if "model" in n]
    assert len(names) >= 7
    for name in names:
        np.testing.assert_array_equal(
            resumed.get_tensor(name), uninterrupted.get_tensor(name), err_msg=name
        )


@pytest.mark.slow
def test_evaluation_mode_writes_results_and_prints_them_last(trained):
    directory, common, _, _ = trained
    process = run_cli(*common, "--evaluation_mode")
    results = json.loads((directory / "test_results.json").read_text())
    best = json.loads((directory / "best_checkpoint" / "metrics.json").read_text())
    assert results["split"] == "test"
    assert results["num_episodes"] == 10000
    assert results["num_classes"] == 5
    assert results["num_tr_examples_per_class"] == 1
    assert results["step"] == best["step"]
    step = best["step"]
    assert results["checkpoint"] == str(
        directory / ".best" / f"step-{step}" / f"ckpt-{step}"
    )
    assert 0.2 < results["accuracy"] <= 1.0
    assert 0 < results["ci95"] < 0.02
    last_line = process.stdout.strip().splitlines()[-1]
    assert last_line.startswith(
        f"Meta-test accuracy {100 * results['accuracy']:.2f}% "
        f"+- {100 * results['ci95']:.2f}%"
    )


@pytest.mark.slow
def test_same_seed_gives_identical_metrics(toy_data, tmp_path):
    runs = {"a": "--seed=7", "b": "--seed=7", "c": "--seed=8"}

    def run(name):
        run_cli(*_flags(toy_data, tmp_path / name, runs[name], "--num_steps_limit=10"))
        scalars = _scalars(tmp_path / name)
        return scalars["train/loss"], scalars["validation/accuracy"]

    # Side by side: the three processes spend most of their time starting up.
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        outputs = list(pool.map(run, runs))
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_invalid_flag_fails_in_one_line_before_tensorflow_loads(toy_data, tmp_path):
    """The real command, nothing written; `-X importtime` lists every module
    the process imported: TensorFlow is not among them, so the child process
    is cheap, not slow. (The messages of each flag are tested in-process in
    test_config.py.)"""
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / "keep.txt").write_text("untouched")
    process = run_fixtures.run_command(
        [sys.executable, "-X", "importtime", "-m", "leo_tf.train"]
        + _flags(toy_data, directory, "--num_classes=1")
    )
    assert process.returncode == 1
    lines = process.stderr.strip().splitlines()
    assert lines[-1] == (
        "leo_tf.train: error: --num_classes=1: must be at least 2 "
        "(N in N-way classification)"
    )
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in lines
        if line.startswith("import time:")
    }
    assert "leo_tf.config" in imported
    assert not {"tensorflow", "keras"} & imported
    assert [p.name for p in directory.iterdir()] == ["keep.txt"]
    assert (directory / "keep.txt").read_text() == "untouched"


@pytest.mark.slow
def test_a_closed_output_pipe_saves_the_step_and_ends_training_with_141(
    toy_data, tmp_path
):
    """`leo_tf.train ... | head -1` (or `| tee` killed by Ctrl-C): the
    progress line's write to the closed pipe stops training as SIGPIPE would,
    but after saving the step; no summary-writing or other error line."""
    directory = tmp_path / "run"
    process = run_fixtures.start_module(
        "leo_tf.train",
        *run_fixtures.toy_run_flags(
            toy_data, directory, num_steps_limit=10**6, summary_steps=1
        ),
    )
    assert process.stdout.readline().startswith("step 1/")
    process.stdout.close()
    assert process.wait(timeout=120) == 141
    stderr = process.stderr.read()
    prefix = tf.train.latest_checkpoint(str(directory))
    step = int(prefix.rsplit("-", 1)[1])
    assert step >= 2  # a step after the one whose line was read
    assert "standard output closed (SIGPIPE): training saves" in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"leo_tf.train: stopped: SIGPIPE: checkpoint of step {step} of 1000000 "
        "saved; rerun the same command to resume"
    ), stderr[-3000:]
    assert not (directory / ".lock").exists()
