"""Few-shot regression runs: resumable training, evaluation, figure, errors.

Reproducible resumable training, the evaluation's files, the figure, and
errors for bad flags and directories.
"""

import dataclasses
import glob
import json
import os
import shutil
import signal
import socket
import struct

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from tensorboard.backend.event_processing import event_accumulator

from leo_tf import checkpoints
from leo_tf import config as options
from leo_tf.regression import __main__ as regression_main
from leo_tf.regression import config as config_lib
from leo_tf.regression import figure, memory, run
from tests import run_fixtures


def _config(directory, **overrides):
    """A run of a few seconds: tiny regressor, latent space and batches."""
    values = dict(
        checkpoint_path=str(directory),
        hidden_units=4,
        num_latents=2,
        inner_unroll_length=1,
        finetuning_unroll_length=1,
        maml_inner_steps=1,
        metatrain_batch_size=2,
        num_query_points=3,
        num_steps_limit=4,
        checkpoint_steps=2,
        summary_steps=2,
        num_eval_tasks=6,
        num_eval_query_points=5,
        num_prediction_samples=3,
        num_figure_tasks=2,
    )
    values.update(overrides)
    return config_lib.RegressionConfig(**values)


def _png_size(data):
    """(width, height) from a PNG's signature and IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _variables(prefix):
    """The checkpoint's variables (not its object graph) by name."""
    reader = tf.train.load_checkpoint(prefix)
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory trained for 4 steps in one go."""
    directory = tmp_path_factory.mktemp("regression") / "run"
    run.train(_config(directory))
    return directory


@pytest.mark.slow
def test_training_resumed_from_a_checkpoint_equals_an_uninterrupted_run(
    trained, tmp_path
):
    interrupted = tmp_path / "run"
    assert run.train(_config(interrupted, num_steps_limit=2))["step"] == 2
    assert run.train(_config(interrupted))["step"] == 4

    straight = _variables(str(trained / "ckpt-4"))
    resumed = _variables(str(interrupted / "ckpt-4"))
    assert straight.keys() == resumed.keys()
    assert any("optimizer" in name for name in straight)  # Adam's state too
    for name, value in straight.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    # Training moved the weights: the comparison is not of initial values.
    first = _variables(str(interrupted / "ckpt-2"))
    assert any(
        not np.array_equal(first[name], value)
        for name, value in straight.items()
        if "decoder" in name
    )


def _damage_data_file(prefix):
    """Overwrites the middle of the checkpoint's data file (checksums fail)."""
    (data,) = glob.glob(f"{prefix}.data-*")
    size = os.path.getsize(data)
    with open(data, "r+b") as file:
        file.seek(size // 2)
        file.write(b"\xff" * min(64, size - size // 2))


def test_a_damaged_latest_checkpoint_is_skipped_by_evaluation_and_resumption(
    trained, tmp_path, caplog
):
    directory = tmp_path / "run"
    shutil.copytree(trained, directory)
    _damage_data_file(directory / "ckpt-4")
    with caplog.at_level("WARNING"):
        results = run.evaluate(_config(directory))
    assert results["step"] == 2
    assert f"Skipping checkpoint {directory / 'ckpt-4'}" in caplog.text
    # Training resumes from step 2 and saves a new, intact ckpt-4 over the
    # damaged one: the same weights as the uninterrupted run's.
    assert run.train(_config(directory))["step"] == 4
    checkpoints.verify_checkpoint(directory / "ckpt-4")
    straight, resumed = _variables(str(trained / "ckpt-4")), _variables(
        str(directory / "ckpt-4")
    )
    for name, value in straight.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_second_trainer_is_refused_naming_the_holder_and_writes_nothing(
    trained, tmp_path
):
    directory = tmp_path / "run"
    shutil.copytree(trained, directory)
    lock = checkpoints.RunLock(directory)
    lock.acquire()
    before = run_fixtures.snapshot(directory)
    try:
        with pytest.raises(checkpoints.CheckpointError) as error:
            run.train(_config(directory, num_steps_limit=6))
    finally:
        after = run_fixtures.snapshot(directory)
        lock.release()
    assert f"--checkpoint_path={directory}: in use by another trainer" in str(
        error.value
    )
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(error.value)
    assert after == before


def test_evaluation_writes_results_figure_and_summaries(trained):
    results = run.evaluate(_config(trained))

    saved = json.loads((trained / run.RESULTS_FILE).read_text())
    task = dict(num_shots=5, noise_stddev=0.3, seed=0)
    assert saved.pop("training_task") == results.pop("training_task") == task
    assert saved == pytest.approx(results)
    for name in ("leo_mse", "maml_mse", "leo_nll", "leo_nll_of_mean"):
        assert np.isfinite(saved[name]) and saved[f"{name}_ci95"] > 0, name
    assert saved["num_tasks"] == 6 and saved["step"] == 4 and saved["seed"] == 0
    assert saved["inner_unroll_length"] == saved["finetuning_unroll_length"] == 1
    assert run.result_line(saved) == (
        f"5-shot regression, 6 held-out tasks, step 4: MSE LEO "
        f"{saved['leo_mse']:.3f} ± {saved['leo_mse_ci95']:.3f}, MAML "
        f"{saved['maml_mse']:.3f} ± {saved['maml_mse_ci95']:.3f}; LEO predictive "
        f"NLL {saved['leo_nll']:.3f} ± {saved['leo_nll_ci95']:.3f} (3 samples)"
    )
    # The figure: 2 panels of 3 x 3 inches at 80 dpi.
    assert _png_size((trained / run.FIGURE_FILE).read_bytes()) == (480, 240)
    [events] = glob.glob(str(trained / "events.out.tfevents.*"))
    accumulator = event_accumulator.EventAccumulator(
        events, size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    tags = accumulator.Tags()["tensors"]
    for tag in ("train/leo_query_mse", "train/maml_query_mse", "validation/leo_mse"):
        assert [e.step for e in accumulator.Tensors(tag)] == [2, 4], tag
    [first, _] = accumulator.Tensors("validation/figure")
    # An image summary holds width, height and the PNG itself.
    width, height, png = tf.make_ndarray(first.tensor_proto)
    assert (int(width), int(height)) == (480, 240) == _png_size(png)
    assert "validation/figure" in tags


def test_figure_is_a_png_of_three_inch_panels():
    rng = np.random.default_rng(0)
    grid = np.linspace(-5, 5, 50)

    data = figure.render_png(
        grid=grid,
        truth=rng.normal(size=(3, 50)),
        support_x=rng.uniform(-5, 5, size=(3, 5)),
        support_y=rng.normal(size=(3, 5)),
        leo_samples=rng.normal(size=(4, 3, 50)),
        maml=rng.normal(size=(3, 50)),
    )

    assert _png_size(data) == (720, 240)
    decoded = tf.image.decode_png(data, channels=3).numpy()
    assert decoded.shape == (240, 720, 3) and decoded.std() > 0


@pytest.mark.parametrize(
    "name", ["hidden_units", "inner_unroll_length", "maml_inner_steps"]
)
def test_evaluation_refuses_checkpoints_of_another_regressor(trained, name):
    """Another architecture, or another adaptation than the one meta-learned."""
    value = getattr(_config(trained), name) + 1
    with pytest.raises(
        options.ConfigError, match=f"made with {name}=.*, not --{name}={value}"
    ):
        run.evaluate(_config(trained, **{name: value}))


def test_evaluating_another_task_records_the_trained_one_and_warns(
    trained, tmp_path, caplog
):
    directory = tmp_path / "run"
    shutil.copytree(trained, directory)
    with caplog.at_level("WARNING"):
        results = run.evaluate(_config(directory, num_shots=3, seed=7))
    assert results["num_shots"] == 3 and results["seed"] == 7
    assert results["training_task"] == dict(num_shots=5, noise_stddev=0.3, seed=0)
    assert "the run was trained with" in caplog.text


def test_a_non_finite_metric_is_null_with_a_warning(caplog):
    values = np.array([1.0, np.nan, 3.0, np.inf])
    with caplog.at_level("WARNING"):
        assert run._mean_and_ci95("leo_mse", values) == {
            "leo_mse": None,
            "leo_mse_ci95": None,
        }
    assert "leo_mse is not finite on 2 of 4 held-out tasks" in caplog.text
    finite = run._mean_and_ci95("maml_mse", np.array([1.0, 3.0]))
    # 1.96 std / sqrt(n), std of [1, 3] about their mean 1.
    assert finite == {"maml_mse": 2.0, "maml_mse_ci95": pytest.approx(1.96 / 2**0.5)}
    results = {
        "num_shots": 5,
        "num_tasks": 4,
        "step": 9,
        "num_prediction_samples": 1,
        "leo_mse": None,
        "leo_mse_ci95": None,
        "maml_mse": 2.0,
        "maml_mse_ci95": 1.96,
        "leo_nll": None,
        "leo_nll_ci95": None,
    }
    assert run.result_line(results) == (
        "5-shot regression, 4 held-out tasks, step 9: MSE LEO not finite, MAML "
        "2.000 ± 1.960; LEO predictive NLL not finite (1 sample)"
    )


def test_a_figure_that_cannot_be_written_is_named_and_the_results_stay(
    trained, tmp_path
):
    directory = tmp_path / "run"
    shutil.copytree(trained, directory)
    (directory / run.RESULTS_FILE).unlink()
    (directory / run.FIGURE_FILE).unlink()
    (directory / run.FIGURE_FILE).mkdir()
    with pytest.raises(checkpoints.CheckpointError) as error:
        run.evaluate(_config(directory))
    assert str(error.value).startswith(f"could not write {directory / run.FIGURE_FILE}")
    assert not (directory / run.RESULTS_FILE).exists()  # results only with a figure
    assert [p.name for p in directory.iterdir() if ".tmp-" in p.name] == []


def test_a_foreign_directory_or_checkpoints_without_config_are_refused(
    trained, tmp_path
):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (foreign / "checkpoint").write_text("my own file")
    with pytest.raises(checkpoints.CheckpointError, match="not a leo_tf run directory"):
        run.train(_config(foreign))
    assert (foreign / "checkpoint").read_text() == "my own file"
    orphans = tmp_path / "orphans"
    shutil.copytree(trained, orphans)
    (orphans / checkpoints.CONFIG_FILE).unlink()
    for command in (run.train, run.evaluate):
        with pytest.raises(
            checkpoints.CheckpointError, match="config.json: missing, but the directory"
        ):
            command(_config(orphans, seed=7, num_steps_limit=6))


def test_a_run_that_failed_before_its_first_checkpoint_can_be_rerun_corrected(
    tmp_path, monkeypatch
):
    """Its config.json protects no checkpoint: a corrected rerun replaces it."""
    directory = tmp_path / "run"

    def failing_step(config, models):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM")

    with monkeypatch.context() as patch:
        patch.setattr(run, "make_train_step", failing_step)
        with pytest.raises(tf.errors.ResourceExhaustedError):
            run.train(_config(directory, metatrain_batch_size=3))
    assert run.train(_config(directory, num_steps_limit=2))["step"] == 2
    saved = json.loads((directory / checkpoints.CONFIG_FILE).read_text())
    assert saved["metatrain_batch_size"] == 2


def test_a_restore_that_fails_leaves_config_json_as_it_was(trained, tmp_path):
    """Checkpoints without their config.json, restored with the wrong
    architecture: the error comes before config.json is written."""
    directory = tmp_path / "run"
    shutil.copytree(trained, directory)
    before = (directory / checkpoints.CONFIG_FILE).read_text()
    stale = json.loads(before)
    (directory / checkpoints.CONFIG_FILE).write_text(
        json.dumps({**stale, "hidden_units": 5})
    )
    edited = (directory / checkpoints.CONFIG_FILE).read_text()
    with pytest.raises(ValueError):
        run.train(_config(directory, hidden_units=5, num_steps_limit=6))
    assert (directory / checkpoints.CONFIG_FILE).read_text() == edited


@pytest.mark.parametrize("at_step", [1, 2])
def test_a_signal_saves_the_step_and_stops(trained, tmp_path, monkeypatch, at_step):
    """At step 1 the step is saved for the signal; at 2 (a checkpoint step)
    its checkpoint is already written, after its validation."""
    directory = tmp_path / "run"
    make_train_step = run.make_train_step

    def signalling(config, models):
        step_fn = make_train_step(config, models)

        def step(batch, seed):
            metrics = step_fn(batch, seed)
            if int(models.step.numpy()) + 1 == at_step:
                os.kill(os.getpid(), signal.SIGTERM)
            return metrics

        return step

    monkeypatch.setattr(run, "make_train_step", signalling)
    outcome = run.train(_config(directory))
    assert outcome == {"step": at_step, "stopped_by": "SIGTERM", "saved": True}
    prefix = tf.train.latest_checkpoint(str(directory))
    assert prefix == str(directory / f"ckpt-{at_step}")
    saves = tf.train.load_checkpoint(prefix).get_tensor(
        "save_counter/.ATTRIBUTES/VARIABLE_VALUE"
    )
    assert saves == 1  # saved once, whether for the signal or as a checkpoint
    monkeypatch.undo()
    assert run.train(_config(directory))["step"] == 4
    straight = _variables(str(trained / "ckpt-4"))
    for name, value in _variables(str(directory / "ckpt-4")).items():
        if not name.startswith("save_counter"):  # one save more
            np.testing.assert_array_equal(value, straight[name], err_msg=name)


class _Killed(BaseException):
    """Stands for the process dying."""


def test_a_run_killed_while_validating_validates_again_on_resume(tmp_path, monkeypatch):
    """Validation comes before the save: killed during step 4's, the step is
    not saved, so the rerun trains and validates it again, and TensorBoard
    has every validation."""
    directory = tmp_path / "run"
    validate = run._validate

    def dying_validation(writer, step, *args):
        if step == 4:
            raise _Killed
        return validate(writer, step, *args)

    with monkeypatch.context() as patch:
        patch.setattr(run, "_validate", dying_validation)
        with pytest.raises(_Killed):
            run.train(_config(directory))
    assert tf.train.latest_checkpoint(str(directory)) == str(directory / "ckpt-2")
    assert run.train(_config(directory))["step"] == 4
    steps = set()
    for events in glob.glob(str(directory / "events.out.tfevents.*")):
        accumulator = event_accumulator.EventAccumulator(
            events, size_guidance={event_accumulator.TENSORS: 0}
        )
        accumulator.Reload()
        if "validation/leo_mse" in accumulator.Tags()["tensors"]:
            steps.update(e.step for e in accumulator.Tensors("validation/leo_mse"))
    assert steps == {2, 4}


def test_a_classification_run_directory_is_refused_in_both_directions(
    trained, tmp_path, toy_data
):
    """leo_tf.regression refuses a leo_tf.train run directory, and
    leo_tf.train a regression one, each naming the command that made it."""
    classification = tmp_path / "classification"
    classification.mkdir()
    config = run_fixtures.toy_run_config(toy_data, classification)
    record = {**config.to_dict(), "embedding_dim": 16}
    (classification / checkpoints.CONFIG_FILE).write_text(json.dumps(record))
    for command in (run.train, run.evaluate):
        with pytest.raises(
            options.ConfigError,
            match="a leo_tf.train run directory .*, not a leo_tf.regression one",
        ):
            command(_config(trained, checkpoint_path=str(classification)))
    with pytest.raises(
        checkpoints.CheckpointError,
        match="a leo_tf.regression run directory .*, not a leo_tf.train one",
    ):
        checkpoints.read_config(trained)


@pytest.mark.parametrize(
    "overrides", [dict(num_shots=6), dict(seed=1), dict(noise_stddev=0.5)]
)
def test_resuming_with_other_task_or_training_flags_is_refused(trained, overrides):
    ((name, value),) = overrides.items()
    before = sorted(p.name for p in trained.iterdir())
    with pytest.raises(
        options.ConfigError, match=f"made with {name}=.*, not --{name}={value};"
    ):
        run.train(_config(trained, num_steps_limit=6, **overrides))
    assert sorted(p.name for p in trained.iterdir()) == before


@pytest.mark.slow
def test_a_read_only_run_is_refused_before_it_is_evaluated(
    trained, tmp_path, monkeypatch
):
    """Its results could not be written: refused before any task is evaluated."""
    directory = tmp_path / "run"
    shutil.copytree(trained, directory)

    def evaluating(*args, **kwargs):
        raise AssertionError("evaluated a run whose results cannot be written")

    monkeypatch.setattr(run, "_held_out_metrics", evaluating)
    with run_fixtures.read_only(directory):
        with pytest.raises(checkpoints.CheckpointError) as error:
            run.evaluate(_config(directory))
    assert str(error.value) == (
        f"--checkpoint_path={directory}: not writable (the evaluation writes "
        "regression_results.json there)"
    )


def test_a_failing_checkpoint_write_is_one_error_naming_what_is_intact(
    tmp_path, monkeypatch
):
    """Disk full at step 4: the ckpt-4_temp TensorFlow wrote into is removed,
    and the error names the directory and the checkpoint of step 2."""
    directory = tmp_path / "run"
    original_save = tf.train.CheckpointManager.save

    def failing_save(self, checkpoint_number=None, **kwargs):
        if checkpoint_number == 4:
            (directory / "ckpt-4_temp").mkdir()
            raise OSError(28, "No space left on device")
        return original_save(self, checkpoint_number=checkpoint_number, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", failing_save)
    with pytest.raises(checkpoints.CheckpointError) as error:
        run.train(_config(directory))
    assert str(error.value) == (
        f"could not write the checkpoint of step 4 to {directory}: [Errno 28] No "
        f"space left on device. The checkpoints ({directory}/ckpt-2) are intact; "
        "rerun to resume from them."
    )
    assert not (directory / "ckpt-4_temp").exists()
    assert tf.train.latest_checkpoint(str(directory)) == str(directory / "ckpt-2")


def test_evaluation_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint"):
        run.evaluate(_config(tmp_path))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_shots=0), "--num_shots=0: must be at least 1"),
        (dict(noise_stddev=-0.1), "--noise_stddev=-0.1: must be a finite number > 0"),
        (
            dict(inner_lr_init=-1.0),
            "--inner_lr_init=-1.0: must be a finite number >= 0",
        ),
        (dict(num_figure_tasks=7), "--num_figure_tasks=7: must be at most"),
        (
            dict(num_eval_tasks=1, num_figure_tasks=1),
            "--num_eval_tasks=1: must be at least 2",
        ),
        (dict(seed=-1), r"--seed=-1: must be an integer in \[0, 2147483645\]"),
        (dict(seed=2**70), r"--seed=1180591620717411303424: must be an integer"),
    ],
)
def test_bad_configurations_are_refused_naming_the_flag(overrides, message):
    with pytest.raises(options.ConfigError, match=message):
        options.check(_config("unused", **overrides))


@pytest.mark.parametrize(
    "flagfile",
    sorted(run_fixtures.REPO.glob("flags/regression_*.cfg")),
    ids=lambda path: path.name,
)
def test_regression_flagfiles_parse_and_validate(flagfile):
    values = flags.FlagValues()
    regression_main.define_flags(values)
    values(["prog", f"--flagfile={flagfile}"])
    config = regression_main.config_from_flags(values)
    assert flagfile.read_text().startswith("#"), "it says what it reproduces"
    assert config.num_shots == int(flagfile.stem.split("_")[1].removesuffix("shot"))
    assert config.noise_stddev == 0.3  # the paper's observation noise
    memory.check_run(config, available=(2**31, "2 GiB"))  # fits in 2 GiB


@pytest.mark.parametrize(
    "batch_size, problem",
    [
        (0, "must be at least 1"),
        # Refused by the size check (regression/memory.py), after TensorFlow
        # loads but before anything is written.
        (10**6, "the per-task parameters of a meta-training batch"),
    ],
)
def test_command_line_reports_a_bad_flag_in_one_line_before_writing(
    tmp_path, batch_size, problem
):
    directory = tmp_path / "run"
    process = run_fixtures.run_module(
        "leo_tf.regression",
        f"--checkpoint_path={directory}",
        f"--metatrain_batch_size={batch_size}",
        timeout=120,
    )

    assert process.returncode == 1
    assert (
        process.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"leo_tf.regression: error: --metatrain_batch_size={batch_size}: {problem}"
        )
    )
    assert not directory.exists()


@pytest.mark.slow
def test_command_line_trains_and_evaluates_a_run(tmp_path):
    """The real command, in a process of its own: the regression flags share
    names with leo_tf.train's, which it must not define."""
    directory = tmp_path / "run"
    values = {**dataclasses.asdict(_config(directory)), "num_steps_limit": 2}
    process = run_fixtures.run_module(
        "leo_tf.regression", *[f"--{name}={value}" for name, value in values.items()]
    )
    assert process.returncode == 0, process.stderr[-2000:]
    results = json.loads((directory / "regression_results.json").read_text())
    assert process.stdout.strip().splitlines()[-1] == run.result_line(results)
    assert results["num_tasks"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("stop_by, status", [("SIGINT", 130), ("SIGPIPE", 141)])
def test_ctrl_c_or_a_closed_output_ends_the_command_with_its_stopped_line(
    tmp_path, stop_by, status
):
    """SIGINT, or standard output's reader gone (`| head`), saves the step."""
    directory = tmp_path / "run"
    values = {**dataclasses.asdict(_config(directory)), "num_steps_limit": 10**6}
    process = run_fixtures.start_module(
        "leo_tf.regression", *[f"--{name}={value}" for name, value in values.items()]
    )
    for line in process.stdout:
        if line.startswith("step 4/"):
            break
    if stop_by == "SIGINT":
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    else:
        process.stdout.close()
        process.wait(timeout=120)
        stderr = process.stderr.read()
    assert process.returncode == status, stderr[-3000:]
    prefix = tf.train.latest_checkpoint(str(directory))
    step = int(prefix.rsplit("-", 1)[1])
    assert step >= 4
    assert stderr.strip().splitlines()[-1] == (
        f"leo_tf.regression: stopped: {stop_by}: checkpoint of step {step} of "
        "1000000 saved; rerun the same command to resume; the evaluation did "
        "not run"
    )
    assert not (directory / run.RESULTS_FILE).exists()
    assert not (directory / checkpoints.LOCK_FILE).exists()
