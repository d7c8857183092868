"""The run directory as a database: one writer, intact checkpoints, valid records.

Also no silent change of task on resume, and failing writes that leave
nothing half-written.
"""

import dataclasses
import errno
import json
import logging
import math
import os
import pathlib
import shutil
import socket
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from leo_tf import checkpoints, evaluation, run_directory, steps, trainer
from leo_tf import config as config_lib
from tests import run_fixtures

DATA_FILE = "ckpt-{}.data-00000-of-00001"


@pytest.fixture(scope="module")
def data_path(toy_data):
    """The shared toy data set (conftest), under this module's name for it."""
    return toy_data


@pytest.fixture(scope="module")
def existing(data_path, tmp_path_factory):
    """A 20-step run: ckpt-10, ckpt-20, a best checkpoint and config.json."""
    directory = tmp_path_factory.mktemp("existing") / "run"
    trainer.train(run_fixtures.toy_run_config(data_path, directory))
    return directory


@pytest.fixture
def run(existing, tmp_path):
    """A private copy of the existing run."""
    shutil.copytree(existing, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


@pytest.fixture
def no_training(monkeypatch):
    def compile_train_step(*args, **kwargs):
        raise AssertionError("a training step was compiled")

    monkeypatch.setattr(steps, "compile_train_step", compile_train_step)


def _config(data_path, run, section=None, **values):
    """toy_run_config (20 steps, all reached), with `section` fields changed."""
    config = run_fixtures.toy_run_config(data_path, run, num_metatest_episodes=50)
    if section:
        changed = dataclasses.replace(getattr(config, section), **values)
        config = dataclasses.replace(config, **{section: changed})
    return config


def _truncate(path):
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def _best_step(run):
    return checkpoints.best_metrics(run)["step"]


def _resume_refusal(data_path, run):
    """The message of the CheckpointError that resuming `run` raises, which
    must leave everything under `run` as it was."""
    before = run_fixtures.snapshot(run)
    with pytest.raises(checkpoints.CheckpointError) as error:
        trainer.train(_config(data_path, run, "train", num_steps_limit=30))
    assert run_fixtures.snapshot(run) == before
    return str(error.value)


def _enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


# --- Ownership ---------------------------------------------------------------


def test_a_rerun_of_a_finished_run_writes_no_events_file(data_path, run):
    """Nothing to train, nothing to summarise: TensorBoard's directory stays
    as it was (a file writer adds an events file as it is made)."""
    before = sorted(p.name for p in run.glob("events.out.tfevents.*"))
    assert trainer.train(_config(data_path, run))["step"] == 20
    assert sorted(p.name for p in run.glob("events.out.tfevents.*")) == before


def test_second_trainer_is_refused_naming_the_holder_and_writes_nothing(
    data_path, run, no_training
):
    lock = checkpoints.RunLock(run)
    lock.acquire()
    before = run_fixtures.snapshot(run)
    try:
        with pytest.raises(checkpoints.CheckpointError) as error:
            trainer.train(_config(data_path, run, "train", num_steps_limit=30))
    finally:
        after = run_fixtures.snapshot(run)
        lock.release()
    message = str(error.value)
    assert f"--checkpoint_path={run}: in use by another trainer" in message
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    assert after == before
    assert not (run / ".lock").exists()


def _exited_pid():
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


@pytest.mark.parametrize("recorded", ["exited", "beyond any pid"])
def test_lock_of_a_dead_process_is_taken_over_and_released_at_the_end(
    data_path, run, caplog, recorded
):
    pid = _exited_pid() if recorded == "exited" else 2**63
    holder = {"pid": pid, "host": socket.gethostname(), "command": "x"}
    (run / ".lock").write_text(json.dumps(holder))

    with caplog.at_level(logging.WARNING):
        outcome = trainer.train(_config(data_path, run))

    assert outcome["step"] == 20
    assert f"{run / '.lock'}: taking over the lock (pid {pid} on" in caplog.text
    assert not (run / ".lock").exists()


def test_lock_recorded_by_another_host_is_refused(data_path, run, no_training):
    holder = {"pid": 4242, "host": "elsewhere", "started": "t", "command": "x"}
    (run / ".lock").write_text(json.dumps(holder))
    before = run_fixtures.snapshot(run)

    with pytest.raises(checkpoints.CheckpointError) as error:
        trainer.train(_config(data_path, run))

    message = str(error.value)
    assert "in use by another trainer (pid 4242 on host elsewhere" in message
    assert f"if that trainer is no longer running, delete {run / '.lock'}" in message
    assert run_fixtures.snapshot(run) == before


def test_broken_symbolic_link_as_checkpoint_path_is_named(
    data_path, tmp_path, no_training
):
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "moved" / "run")

    with pytest.raises(checkpoints.CheckpointError) as error:
        trainer.train(_config(data_path, link))

    assert str(error.value) == (
        f"--checkpoint_path={link}: a broken symbolic link to "
        f"{str(tmp_path / 'moved' / 'run')!r}"
    )
    assert not (tmp_path / "moved").exists()


def test_checkpoints_appearing_while_a_trainer_starts_are_not_overwritten(
    data_path, existing, tmp_path, monkeypatch, no_training
):
    run = tmp_path / "new"
    latest_intact_checkpoint = checkpoints.latest_intact_checkpoint

    def racing(directory):
        found = latest_intact_checkpoint(directory)  # none yet
        shutil.copytree(existing, run, symlinks=True)  # another trainer's work
        return found

    monkeypatch.setattr(checkpoints, "latest_intact_checkpoint", racing)
    with pytest.raises(checkpoints.CheckpointError) as error:
        trainer.train(_config(data_path, run))

    assert str(error.value) == (
        f"--checkpoint_path={run}: another trainer wrote checkpoints there "
        "while this one was starting; rerun to resume from them"
    )
    assert run_fixtures.snapshot(run) == run_fixtures.snapshot(existing)


# --- Consistent reads --------------------------------------------------------


def test_reader_of_the_best_checkpoint_survives_the_next_promotion(run):
    prefix, metrics = checkpoints.best_checkpoint(run)
    best = metrics["step"]
    other = 30 - best  # the other of steps 10 and 20
    assert pathlib.Path(prefix) == run / ".best" / f"step-{best}" / f"ckpt-{best}"

    checkpoints.promote_to_best(run, run / f"ckpt-{other}", {"step": other})

    assert checkpoints.best_checkpoint_prefix(run).endswith(
        f"step-{other}/ckpt-{other}"
    )
    checkpoints.verify_checkpoint(prefix)  # the reader's prefix still reads back
    step = tf.train.load_checkpoint(prefix).get_tensor(
        "step/.ATTRIBUTES/VARIABLE_VALUE"
    )
    assert step == best
    # One promotion later the oldest copy goes, the previous one stays.
    checkpoints.promote_to_best(run, run / f"ckpt-{best}", {"step": best})
    assert sorted(p.name for p in (run / ".best").iterdir()) == ["step-10", "step-20"]


# --- Integrity ---------------------------------------------------------------


@pytest.mark.parametrize(
    "damage,named,reason",
    [
        ("truncated_data", DATA_FILE.format(20), "Read less bytes than requested"),
        ("garbage_index", "ckpt-20.index", "not an sstable (bad magic number)"),
    ],
)
def test_resume_skips_a_damaged_latest_checkpoint_naming_it(
    data_path, run, caplog, damage, named, reason
):
    if damage == "truncated_data":
        _truncate(run / DATA_FILE.format(20))
    else:
        (run / "ckpt-20.index").write_bytes(b"not a table" * 20)

    with caplog.at_level(logging.INFO):
        outcome = trainer.train(_config(data_path, run, "train", num_steps_limit=10))

    assert outcome["step"] == 10
    assert (
        f"Skipping checkpoint {run / 'ckpt-20'}: {run / named}: damaged ({reason})"
        in (caplog.text)
    )
    assert f"Resuming from {run / 'ckpt-10'} at step 10" in caplog.text
    assert tf.train.latest_checkpoint(str(run)) == str(run / "ckpt-10")


def test_no_intact_checkpoint_is_refused_naming_each(data_path, run, no_training):
    _truncate(run / DATA_FILE.format(20))
    (run / "ckpt-10.index").write_bytes(b"\0" * 100)

    message = _resume_refusal(data_path, run)

    assert f"--checkpoint_path={run}: no intact checkpoint" in message
    assert f"{run / DATA_FILE.format(20)}: damaged" in message
    assert f"{run / 'ckpt-10.index'}: damaged" in message
    assert message.endswith("); move the damaged ones away to start again from step 0")

    # A reader is not told how to train again.
    (run / "best_checkpoint").unlink()
    shutil.rmtree(run / ".best")
    with pytest.raises(checkpoints.CheckpointError) as error:
        evaluation.evaluate(_config(data_path, run))
    assert str(error.value).startswith(f"--checkpoint_path={run}: no intact")
    assert str(error.value).endswith("); nothing to evaluate")


def _replace_by_a_directory(path):
    path.unlink()
    (path / "notes").mkdir(parents=True)


def test_resume_refuses_a_directory_in_place_of_a_newer_checkpoint_file(
    data_path, run, no_training
):
    """Resuming from ckpt-10 would save step 20 over the directory: refused
    before any training step, naming the file, nothing touched."""
    data = run / DATA_FILE.format(20)
    _replace_by_a_directory(data)

    assert _resume_refusal(data_path, run) == (
        f"{data}: a directory, not a checkpoint file; resuming from "
        f"{run / 'ckpt-10'} would save ckpt-20 over it: move it away, then rerun"
    )


def test_evaluation_falls_back_from_a_directory_in_place_of_a_checkpoint_file(
    data_path, run, caplog
):
    best = _best_step(run)
    best_data = run / ".best" / f"step-{best}" / DATA_FILE.format(best)
    _replace_by_a_directory(best_data)
    _replace_by_a_directory(run / DATA_FILE.format(20))

    with caplog.at_level(logging.WARNING):
        results = evaluation.evaluate(_config(data_path, run))

    assert (
        f"best_checkpoint unusable, {best_data}: a directory, not a checkpoint "
        "file; evaluating the latest intact checkpoint instead" in caplog.text
    )
    assert (
        f"Skipping checkpoint {run / 'ckpt-20'}: {run / DATA_FILE.format(20)}: a "
        "directory, not a checkpoint file" in caplog.text
    )
    assert results["checkpoint"] == str(run / "ckpt-10")


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_missing_checkpoint_index_is_rebuilt_not_a_restart_from_step_0(
    data_path, run, caplog, damage
):
    if damage == "deleted":
        (run / "checkpoint").unlink()
    else:
        (run / "checkpoint").write_text("")

    with caplog.at_level(logging.INFO):
        outcome = trainer.train(_config(data_path, run))

    assert outcome["step"] == 20
    assert f"Resuming from {run / 'ckpt-20'} at step 20" in caplog.text
    assert f"{run / 'checkpoint'}: missing or unreadable; rebuilt" in caplog.text
    state = tf.train.get_checkpoint_state(str(run))
    assert state.model_checkpoint_path == str(run / "ckpt-20")
    assert list(state.all_model_checkpoint_paths) == [
        str(run / "ckpt-10"),
        str(run / "ckpt-20"),
    ]


def test_rebuilt_index_hands_every_checkpoint_to_the_manager_to_rotate(run):
    (run / "checkpoint").unlink()

    checkpoints.index_checkpoint(run, str(run / "ckpt-20"))

    manager = tf.train.CheckpointManager(tf.train.Checkpoint(), str(run), 5)
    assert manager.latest_checkpoint == str(run / "ckpt-20")
    assert manager.checkpoints == [str(run / "ckpt-10"), str(run / "ckpt-20")]


def test_rebuilt_index_leaves_out_an_older_checkpoint_a_save_cannot_remove(run, caplog):
    """Rotating it out would fail the save that does; it is named instead."""
    data = run / DATA_FILE.format(10)
    _replace_by_a_directory(data)
    (run / "checkpoint").unlink()

    with caplog.at_level(logging.WARNING):
        checkpoints.index_checkpoint(run, str(run / "ckpt-20"))

    state = tf.train.get_checkpoint_state(str(run))
    assert list(state.all_model_checkpoint_paths) == [str(run / "ckpt-20")]
    assert (
        f"{data}: a directory, not a checkpoint file; {run / 'ckpt-10'} left out "
        f"of {run / 'checkpoint'}, so never rotated out: move it away"
    ) in caplog.text


def _resume_without_promotions(data_path, run, monkeypatch, **train):
    """Resumes `run` with `train` settings and one validation batch a
    checkpoint, never promoting; (steps of the checkpoints left, steps the
    index lists), each in ascending order."""
    monkeypatch.setattr(
        run_directory.RunDirectory, "beats_best", lambda self, accuracy: False
    )
    trainer.train(_config(data_path, run, "train", num_metavalid_batches=1, **train))
    state = tf.train.get_checkpoint_state(str(run))
    return (
        sorted(int(p.rsplit("-", 1)[1]) for p in checkpoints.checkpoint_prefixes(run)),
        [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths],
    )


def test_checkpoints_of_a_rebuilt_missing_index_are_rotated_out(
    data_path, run, monkeypatch
):
    """ckpt-10 and ckpt-20 go as five newer ones are saved; best_checkpoint's
    copy of the best of them is untouched."""
    (run / "checkpoint").unlink()
    best = run_fixtures.snapshot(run / ".best")

    on_disk, indexed = _resume_without_promotions(
        data_path, run, monkeypatch, num_steps_limit=25, checkpoint_steps=1
    )

    assert on_disk == indexed == [21, 22, 23, 24, 25]
    assert run_fixtures.snapshot(run / ".best") == best
    checkpoints.verify_checkpoint(checkpoints.best_checkpoint_prefix(run))


def test_older_checkpoints_an_index_leaves_out_are_listed_again_and_rotated_out(
    data_path, run, monkeypatch, caplog
):
    """An index that names the latest but not ckpt-10, as one rebuilt without
    timestamps by an earlier leo_tf left it, is rebuilt: ckpt-10 goes too."""
    index = run / "checkpoint"
    index.write_text(checkpoints._checkpoint_index(["ckpt-20"]))

    with caplog.at_level(logging.WARNING):
        on_disk, indexed = _resume_without_promotions(
            data_path, run, monkeypatch, num_steps_limit=25, checkpoint_steps=1
        )

    assert on_disk == indexed == [21, 22, 23, 24, 25]
    assert (
        f"{index}: named {run / 'ckpt-20'} but not ckpt-10; rebuilt from the "
        "files, naming ckpt-20"
    ) in caplog.text


def test_checkpoints_of_an_index_rebuilt_past_a_damaged_latest_are_rotated_out(
    data_path, run, monkeypatch
):
    """Resumed from ckpt-10, the saves replace the damaged ckpt-20 and rotate
    ckpt-10 out; best_checkpoint's copy is untouched."""
    _truncate(run / DATA_FILE.format(20))
    best = run_fixtures.snapshot(run / ".best")

    on_disk, indexed = _resume_without_promotions(
        data_path, run, monkeypatch, num_steps_limit=20, checkpoint_steps=2
    )

    assert on_disk == indexed == [12, 14, 16, 18, 20]
    checkpoints.verify_checkpoint(str(run / "ckpt-20"))
    assert run_fixtures.snapshot(run / ".best") == best
    checkpoints.verify_checkpoint(checkpoints.best_checkpoint_prefix(run))


def test_resume_replaces_a_damaged_best_checkpoint(data_path, run, caplog):
    best = _best_step(run)
    _truncate(run / ".best" / f"step-{best}" / DATA_FILE.format(best))

    with caplog.at_level(logging.WARNING):
        trainer.train(_config(data_path, run))

    assert f"best_checkpoint unusable, {run}/.best/step-{best}/" in caplog.text
    checkpoints.verify_checkpoint(checkpoints.best_checkpoint_prefix(run))
    assert _best_step(run) == 20  # the restored latest, validated when saved


def test_evaluation_falls_back_from_a_damaged_best_to_the_latest_intact(
    data_path, run, caplog
):
    best = _best_step(run)
    _truncate(run / ".best" / f"step-{best}" / DATA_FILE.format(best))

    with caplog.at_level(logging.WARNING):
        results = evaluation.evaluate(_config(data_path, run))

    assert f"best_checkpoint unusable, {run}/.best/step-{best}/" in caplog.text
    assert "(Read less bytes than requested); evaluating the latest intact" in (
        caplog.text
    )
    assert results["checkpoint_source"] == "latest"
    assert results["checkpoint"] == str(run / "ckpt-20")
    assert results["step"] == 20


# --- JSON records ------------------------------------------------------------


def _rewrite(name, change):
    """A case that replaces the JSON record `name` with change(record)."""

    def setup(run):
        path = run / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return setup


def _without(section, key):
    def change(record):
        del record[section][key]
        return record

    return change


def _with(key, value):
    return lambda record: {**record, key: value}


# (id, setup, fragments of the CheckpointError)
BAD_RECORDS = [
    ("config_empty", _rewrite("config.json", lambda r: {}), ["config.json: no model"]),
    (
        "config_array",
        _rewrite("config.json", lambda r: [r]),
        ["config.json: expected a JSON object, found an array"],
    ),
    (
        "config_missing_model_key",
        _rewrite("config.json", _without("model", "num_latents")),
        ["config.json: no model.num_latents (expected an integer)"],
    ),
    (
        "config_string_number",
        _rewrite(
            "config.json", lambda r: {**r, "data": {**r["data"], "num_classes": "5"}}
        ),
        ['config.json: data.num_classes is "5", expected an integer'],
    ),
    (
        "config_no_embedding_dim",
        _rewrite("config.json", lambda r: {**r, "embedding_dim": None}),
        ["config.json: embedding_dim is null, expected a positive integer"],
    ),
    (
        "metrics_string_accuracy",
        _rewrite("best_checkpoint/metrics.json", _with("metavalid_accuracy", "0.5")),
        ['metrics.json: metavalid_accuracy is "0.5", expected a number in [0, 1]'],
    ),
    (
        "metrics_empty",
        _rewrite("best_checkpoint/metrics.json", lambda r: {}),
        ["metrics.json: no step (expected an integer >= 0)"],
    ),
    (
        "metrics_string",
        _rewrite("best_checkpoint/metrics.json", lambda r: "best"),
        ["metrics.json: expected a JSON object, found a string"],
    ),
]


@pytest.mark.parametrize(
    "case,setup,fragments", BAD_RECORDS, ids=[case[0] for case in BAD_RECORDS]
)
def test_malformed_record_is_named_with_its_field_and_changes_nothing(
    data_path, run, no_training, case, setup, fragments
):
    setup(run)
    before = run_fixtures.snapshot(run)

    with pytest.raises(checkpoints.CheckpointError) as error:
        trainer.train(_config(data_path, run, "train", num_steps_limit=30))

    for fragment in fragments:
        assert fragment in str(error.value), case
    assert run_fixtures.snapshot(run) == before


# --- Compatibility -----------------------------------------------------------


@pytest.mark.parametrize(
    "section,values,made_with,not_with",
    [
        (
            "data",
            {"metatrain_batch_size": 8},
            "metatrain_batch_size=4",
            "--metatrain_batch_size=8",
        ),
        (
            "model",
            {"inner_unroll_length": 3},
            "inner_unroll_length=5",
            "--inner_unroll_length=3",
        ),
        ("model", {"dropout_rate": 0.5}, "dropout_rate=0.2", "--dropout_rate=0.5"),
        ("optimizer", {"outer_lr": 0.01}, "outer_lr=0.001", "--outer_lr=0.01"),
        (
            "train",
            {"seed": 3, "num_steps_limit": 40, "checkpoint_steps": 5},
            "seed=0",
            "--seed=3",
        ),
    ],
)
def test_resume_with_other_task_or_model_flags_is_refused_naming_them(
    data_path, run, no_training, section, values, made_with, not_with
):
    before = run_fixtures.snapshot(run)

    with pytest.raises(config_lib.ConfigError) as error:
        trainer.train(_config(data_path, run, section, **values))

    message = str(error.value)
    assert f"--checkpoint_path={run}: this run was made with {made_with} " in message
    assert f"(its config.json), not {not_with}; pass the run's values" in message
    assert "num_steps_limit" not in message and "checkpoint_steps" not in message
    assert run_fixtures.snapshot(run) == before


def test_free_flags_may_change_on_resume_and_the_task_may_not(data_path, run, tmp_path):
    moved_data = shutil.copytree(data_path, tmp_path / "moved_data")
    config = _config(data_path, run)
    free = dataclasses.replace(
        config,
        data=dataclasses.replace(
            config.data, data_path=str(moved_data), metatest_batch_size=25
        ),
        train=dataclasses.replace(
            config.train, checkpoint_steps=5, summary_steps=2, num_towers=1
        ),
    )
    assert trainer.train(free)["step"] == 20
    saved = (run / "config.json").read_text()
    assert json.loads(saved)["train"]["checkpoint_steps"] == 5
    assert json.loads(saved)["data"]["data_path"] == str(moved_data)
    other_task = dataclasses.replace(
        free,
        data=dataclasses.replace(free.data, num_classes=2, num_tr_examples_per_class=5),
    )

    with pytest.raises(config_lib.ConfigError) as error:
        trainer.train(other_task)

    assert str(error.value) == (
        f"--checkpoint_path={run}: this run was made with num_classes=5, "
        "num_tr_examples_per_class=1 (its config.json), not --num_classes=2, "
        "--num_tr_examples_per_class=5; pass the run's values, or use another "
        "--checkpoint_path"
    )
    assert (run / "config.json").read_text() == saved


def test_evaluation_averages_exactly_the_asked_number_of_episodes(data_path, run):
    """30 episodes, fewer than the batch of 50: not a whole batch."""
    results = evaluation.evaluate(
        _config(data_path, run, "train", num_metatest_episodes=30)
    )

    assert results["num_episodes"] == 30
    assert "(95% interval, 30 episodes, 5-way 1-shot" in evaluation.result_line(results)


def test_evaluation_refuses_other_unroll_lengths_but_evaluates_another_task(
    data_path, run
):
    with pytest.raises(config_lib.ConfigError, match="--finetuning_unroll_length=2"):
        evaluation.evaluate(
            _config(data_path, run, "model", finetuning_unroll_length=2)
        )

    results = evaluation.evaluate(
        _config(data_path, run, "data", num_classes=2, num_tr_examples_per_class=5)
    )

    assert (results["num_classes"], results["num_tr_examples_per_class"]) == (2, 5)
    assert results["training_task"] == {
        "dataset_name": "toy",
        "num_classes": 5,
        "num_tr_examples_per_class": 1,
    }


# --- Failing writes ----------------------------------------------------------


@pytest.mark.parametrize("failing", ["shutil.copy2", "os.symlink"])
def test_disk_full_during_promotion_leaves_nothing_half_written_and_rerun_promotes(
    data_path, run, monkeypatch, failing
):
    (run / "best_checkpoint").unlink()  # so the restored ckpt-20 is promoted
    shutil.rmtree(run / ".best")
    module, name = failing.split(".")
    holders = []

    def full(*args, **kwargs):
        holders.append(json.loads((run / ".lock").read_text())["pid"])
        raise _enospc(args[1])

    monkeypatch.setattr(getattr(checkpoints, module), name, full)
    with pytest.raises(checkpoints.CheckpointError) as error:
        trainer.train(_config(data_path, run))
    monkeypatch.undo()

    assert str(error.value).startswith(
        f"could not promote {run / 'ckpt-20'} to {run / 'best_checkpoint'}: "
        "[Errno 28] No space left on device: "
    )
    assert holders == [os.getpid()]  # the trainer held the lock when writing
    assert list((run / ".best").iterdir()) == []
    assert not (run / "best_checkpoint").is_symlink()
    assert [p.name for p in run.glob(".*")] == [".best"]  # no lock, no temporaries

    trainer.train(_config(data_path, run))
    assert _best_step(run) == 20


@pytest.mark.slow
def test_disk_full_while_writing_summaries_is_one_error_and_rerun_resumes(
    data_path, run, monkeypatch, caplog
):
    create_file_writer = tf.summary.create_file_writer

    def full_writer(logdir, **kwargs):
        writer = create_file_writer(logdir, **kwargs)

        def flush():
            raise _enospc(pathlib.Path(logdir) / "events.out.tfevents")

        writer.flush = flush
        return writer

    monkeypatch.setattr(tf.summary, "create_file_writer", full_writer)
    with pytest.raises(checkpoints.CheckpointError) as error:
        trainer.train(_config(data_path, run, "train", num_steps_limit=30))
    new_run = run.parent / "new_run"
    with pytest.raises(checkpoints.CheckpointError) as new_run_error:
        trainer.train(_config(data_path, new_run))
    monkeypatch.undo()

    message = str(error.value)
    assert message.startswith(
        f"could not write TensorBoard summaries to {run}: [Errno 28] No space left"
    )
    assert f"The checkpoints ({run / 'ckpt-20'}) and best_checkpoint are intact" in (
        message
    )
    assert str(new_run_error.value).endswith(
        "No checkpoint was written yet; rerun to start again."
    )
    assert not (run / ".lock").exists()
    with caplog.at_level(logging.INFO):
        assert trainer.train(_config(data_path, run))["step"] == 20
    assert f"Resuming from {run / 'ckpt-20'} at step 20" in caplog.text


def _failing_replace(monkeypatch, file_name):
    """Makes os.replace onto `file_name` fail as on a full disk."""
    replace = os.replace

    def failing(source, destination):
        if pathlib.Path(destination).name == file_name:
            raise _enospc(destination)
        return replace(source, destination)

    monkeypatch.setattr(os, "replace", failing)


def test_disk_full_writing_config_json_changes_nothing(
    data_path, run, monkeypatch, no_training
):
    _failing_replace(monkeypatch, "config.json")

    assert _resume_refusal(data_path, run) == (
        f"could not write {run / 'config.json'}: [Errno 28] No space left on "
        f"device: '{run / 'config.json'}'"
    )


def test_disk_full_writing_test_results_names_the_file_and_keeps_the_figures(
    data_path, run, monkeypatch
):
    _failing_replace(monkeypatch, "test_results.json")

    with pytest.raises(checkpoints.CheckpointError) as error:
        evaluation.evaluate(_config(data_path, run))

    message = str(error.value)
    assert message.startswith(
        f"could not write {run / 'test_results.json'}: [Errno 28] No space left"
    )
    assert (
        "; Meta-test accuracy " in message and "(95% interval, 50 episodes" in message
    )
    assert not list(run.glob("*test_results.json*"))


def test_a_folder_that_is_not_a_run_is_refused_and_left_untouched(
    data_path, tmp_path, no_training
):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "checkpoint").write_text("my notes")  # TensorFlow's index name
    (folder / "thesis.tex").write_text("\\documentclass{article}")
    before = run_fixtures.snapshot(folder)
    with pytest.raises(
        checkpoints.CheckpointError,
        match=(
            rf"--checkpoint_path={folder}: not a leo_tf run directory \(no "
            r"config.json\) and not empty \(holds checkpoint, thesis.tex\)"
        ),
    ):
        trainer.train(run_fixtures.toy_run_config(data_path, folder))
    assert run_fixtures.snapshot(folder) == before


@pytest.mark.slow
def test_a_new_run_may_start_beside_flagfiles_and_summaries(data_path, tmp_path):
    folder = tmp_path / "trial"
    folder.mkdir()
    (folder / "trial.cfg").write_text("--num_latents=8\n")
    (folder / "events.out.tfevents.1.host.hparams").write_bytes(b"")
    outcome = trainer.train(run_fixtures.toy_run_config(data_path, folder))
    assert outcome["step"] == 20
    assert (folder / checkpoints.CONFIG_FILE).is_file()


# --- RunDirectory in process: checkpoint resolution and the best record ------


def _tiny_checkpoint(directory, step, value=None):
    """Writes checkpoint `directory`/ckpt-<step> of a step variable and a
    [2] weight; its prefix."""
    weight = tf.Variable(
        [step, value if value is not None else -step], dtype=tf.float32
    )
    step_variable = tf.Variable(step, dtype=tf.int64)
    prefix = str(directory / f"ckpt-{step}")
    tf.train.Checkpoint(step=step_variable, weight=weight).write(prefix)
    return prefix


@pytest.fixture
def tiny_run(tmp_path):
    """ckpt-1 and ckpt-2 (the latest), ckpt-1 promoted to best with accuracy 0.6."""
    directory = tmp_path / "tiny"
    directory.mkdir()
    first = _tiny_checkpoint(directory, 1)
    _tiny_checkpoint(directory, 2)
    checkpoints.promote_to_best(
        directory, first, {"step": 1, "metavalid_accuracy": 0.6}
    )
    return directory


def _best_data_file(directory):
    return pathlib.Path(
        f"{checkpoints.best_checkpoint_prefix(directory)}.data-00000-of-00001"
    )


def test_reader_takes_the_best_checkpoint_when_it_is_intact(tiny_run, caplog):
    directory = run_directory.RunDirectory(tiny_run)
    with caplog.at_level(logging.WARNING):
        prefix, source = directory.checkpoint_to_read("best", "evaluate")
    assert source == "best"
    assert prefix == str(tiny_run.resolve() / ".best" / "step-1" / "ckpt-1")
    assert caplog.text == ""
    assert directory.checkpoint_to_read("latest", "export") == (
        str(tiny_run / "ckpt-2"),
        "latest",
    )


def test_reader_falls_back_from_a_damaged_best_to_the_latest_intact_saying_so(
    tiny_run, caplog
):
    damaged = _best_data_file(tiny_run)
    _truncate(damaged)
    directory = run_directory.RunDirectory(tiny_run)
    with caplog.at_level(logging.WARNING):
        prefix, source = directory.checkpoint_to_read("best", "export")
    assert (prefix, source) == (str(tiny_run / "ckpt-2"), "latest")
    assert f"best_checkpoint unusable, {damaged}: damaged (" in caplog.text
    assert "exporting the latest intact checkpoint instead" in caplog.text
    assert f"Exporting {tiny_run / 'ckpt-2'}" in caplog.text


def test_reader_without_a_best_checkpoint_takes_the_latest_intact_one(tmp_path, caplog):
    _tiny_checkpoint(tmp_path, 1)
    _tiny_checkpoint(tmp_path, 2)
    _truncate(tmp_path / DATA_FILE.format(2))
    directory = run_directory.RunDirectory(tmp_path)
    with caplog.at_level(logging.WARNING):
        prefix, source = directory.checkpoint_to_read("best", "evaluate")
    assert (prefix, source) == (str(tmp_path / "ckpt-1"), "latest")
    assert f"No best_checkpoint in {tmp_path}: evaluating the latest" in caplog.text
    assert f"Skipping checkpoint {tmp_path / 'ckpt-2'}" in caplog.text


def test_reader_without_any_checkpoint_is_refused(tmp_path):
    with pytest.raises(
        checkpoints.CheckpointError,
        match=rf"--checkpoint_path={tmp_path}: no checkpoint to export \(train",
    ):
        run_directory.RunDirectory(tmp_path).checkpoint_to_read("best", "export")


class _VanishingReader:
    """Stands for a CheckpointedLEO whose first `vanishing` restores find the
    files gone, as when a trainer promotes twice meanwhile."""

    def __init__(self, vanishing):
        self.vanishing = vanishing
        self.restored = []

    def restore(self, prefix):
        self.restored.append(prefix)
        if len(self.restored) <= self.vanishing:
            raise tf.errors.NotFoundError(None, None, f"{prefix}: gone")
        return 7


def test_reader_resolves_a_vanished_checkpoint_again(tiny_run, caplog):
    reader = _VanishingReader(vanishing=2)
    directory = run_directory.RunDirectory(tiny_run)
    with caplog.at_level(logging.WARNING):
        prefix, source, step = directory.restore_for_reading(reader, "best", "export")
    assert (source, step) == ("best", 7)
    assert reader.restored == [prefix] * 3
    assert caplog.text.count("vanished while being read; resolving again") == 2


def test_reader_gives_up_on_a_checkpoint_that_keeps_vanishing(tiny_run):
    reader = _VanishingReader(vanishing=run_directory.RESTORE_ATTEMPTS)
    with pytest.raises(
        checkpoints.CheckpointError,
        match=rf"the latest checkpoint was replaced while being read, 3 times "
        rf"in a row \(last {tiny_run / 'ckpt-2'}\); try again",
    ):
        run_directory.RunDirectory(tiny_run).restore_for_reading(
            reader, "latest", "evaluate"
        )


def test_best_record_is_read_compared_strictly_and_promoted(tiny_run):
    directory = run_directory.RunDirectory(tiny_run)
    assert directory.best_record is None
    directory.load_best_record()
    assert directory.best_record == {"step": 1, "metavalid_accuracy": 0.6}
    assert directory.describe_best() == "0.6000 at step 1"
    assert not directory.beats_best(0.5)
    assert not directory.beats_best(0.6)  # a tie keeps the earlier checkpoint
    assert directory.beats_best(0.61)

    record = {"step": 2, "metavalid_accuracy": 0.75, "checkpoint": "ckpt-2"}
    directory.promote(str(tiny_run / "ckpt-2"), record)

    assert directory.best_record == record
    assert checkpoints.best_metrics(tiny_run) == record
    assert checkpoints.best_checkpoint_prefix(tiny_run) == str(
        tiny_run.resolve() / ".best" / "step-2" / "ckpt-2"
    )
    reread = run_directory.RunDirectory(tiny_run)
    reread.load_best_record()
    assert reread.best_record == record


def test_a_damaged_best_checkpoint_leaves_no_best_record(tiny_run, caplog):
    _truncate(_best_data_file(tiny_run))
    directory = run_directory.RunDirectory(tiny_run)
    with caplog.at_level(logging.WARNING):
        directory.load_best_record()
    assert directory.best_record is None
    assert "the next validated checkpoint replaces it" in caplog.text
    assert directory.beats_best(0.0)


@pytest.mark.parametrize(
    "accuracy,promoted", [(float("nan"), False), (0.5, False), (0.7, True)]
)
def test_restored_checkpoint_is_promoted_only_if_validated_and_better(
    tiny_run, accuracy, promoted
):
    directory = run_directory.RunDirectory(tiny_run)
    directory.load_best_record()
    record = {"step": 2, "metavalid_accuracy": accuracy}
    directory.promote_if_better(str(tiny_run / "ckpt-2"), record)
    assert checkpoints.best_metrics(tiny_run)["step"] == (2 if promoted else 1)


def test_unvalidated_checkpoint_is_not_promoted_even_without_a_best(tmp_path):
    prefix = _tiny_checkpoint(tmp_path, 3)
    directory = run_directory.RunDirectory(tmp_path)
    directory.load_best_record()
    directory.promote_if_better(prefix, {"step": 3, "metavalid_accuracy": math.nan})
    assert checkpoints.best_checkpoint(tmp_path) is None
    directory.promote_if_better(prefix, {"step": 3, "metavalid_accuracy": 0.25})
    assert checkpoints.best_metrics(tmp_path)["step"] == 3


def test_best_record_states_the_estimate_it_was_chosen_by(tmp_path):
    config = run_fixtures.toy_run_config(tmp_path, tmp_path / "run")
    record = run_directory.best_record(config, 40, 0.8125)
    assert record == {
        "step": 40,
        "metavalid_accuracy": 0.8125,
        "checkpoint": "ckpt-40",
        "dataset_name": "toy",
        "num_classes": 5,
        "num_tr_examples_per_class": 1,
        # 10 batches (the default) of metavalid_batch_size 20.
        "num_metavalid_episodes": 200,
    }


def test_reader_restores_what_training_saved(tmp_path):
    model_config = config_lib.ModelConfig(num_latents=4)
    trained = run_directory.build_leo(
        model_config, 6, seed=1, optimizer_config=config_lib.OptimizerConfig()
    )
    trained.step.assign(12)
    trained.validation_accuracy.assign(0.5)
    prefix = trained.checkpoint.save(str(tmp_path / "ckpt"))  # as training saves

    reader = run_directory.build_leo(model_config, 6, seed=2)
    assert reader.optimizer is None and reader.validation_accuracy is None
    assert reader.restore(prefix) == 12
    for saved, restored in zip(
        trained.model.trainable_variables, reader.model.trainable_variables
    ):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())

    resumed = run_directory.build_leo(
        model_config, 6, seed=3, optimizer_config=config_lib.OptimizerConfig()
    )
    assert resumed.restore(prefix) == 12
    assert resumed.validation_accuracy.numpy() == 0.5
