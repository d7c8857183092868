"""leo_tf.search: resumable random search, results, HParams, best.cfg."""

import dataclasses
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
from absl.testing import flagsaver
from tensorboard.plugins.hparams import plugin_data_pb2

from leo_tf import checkpoints, evaluation, search, search_space, trainer, trials
from leo_tf.data import embeddings
from tests import data_fixtures, run_fixtures

# One dimension of each kind; num_latents changes the model's shapes.
SPACE = (
    "outer_lr:loguniform:1e-4:1e-2",
    "dropout_rate:uniform:0:0.5",
    "finetuning_unroll_length:int:0:3",
    "num_latents:choice:4,8",
)
NUM_TRIALS = 4
FAILING, DIVERGING, FINISHED, KILLED = range(NUM_TRIALS)


def _base_args(data_path):
    """Fast 5-way 1-shot runs of 20 steps on data_fixtures' toy set."""
    return [
        f"--data_path={data_path}",
        "--dataset_name=toy",
        "--num_steps_limit=20",
        "--checkpoint_steps=10",
        "--summary_steps=10",
        "--metatrain_batch_size=4",
        "--metavalid_batch_size=20",
        "--metatest_batch_size=50",
    ]


class _Killed(BaseException):
    """Stands for the process dying: not an Exception, so nothing handles it."""


def _snapshot(directory):
    """{relative path: (bytes, mtime_ns)} of every file under directory."""
    return {
        str(path.relative_to(directory)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(pathlib.Path(directory).rglob("*"))
        if path.is_file()
    }


def _search(data_path, search_dir, log=lambda line: None, **options):
    """The search of NUM_TRIALS trials of SPACE, seed 0; `options` for run_search."""
    return trials.run_search(
        _base_args(data_path),
        search_space.parse_space(SPACE),
        search_dir,
        NUM_TRIALS,
        seed=0,
        log=log,
        **options,
    )


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A search killed during its last trial, then rerun with the same command.

    Without a test split on disk. In the first run, trial 0's training raises,
    trial 1's ends without a checkpoint (diverged), trial 2 trains, and trial
    3 is killed after its checkpoint at step 10. Records what each run
    trained and which splits were read.
    """
    root = tmp_path_factory.mktemp("search")
    data_path = data_fixtures.write_toy_dataset(root / "data")
    (data_path / "toy" / "center" / "test_embeddings.pkl").unlink()
    search_dir = root / "search"
    real_train, real_load_split = trainer.train, embeddings.load_split
    splits, trained = [], []

    def spying_load_split(*args, **kwargs):
        splits.append(args[3])
        return real_load_split(*args, **kwargs)

    def first_run_train(config, strategy=None):
        directory = pathlib.Path(config.train.checkpoint_path)
        trial = int(directory.name.split("-")[1])
        if trial == FAILING:
            raise RuntimeError("injected failure\nsecond line")
        if trial == DIVERGING:
            return {"step": config.train.num_steps_limit}
        if trial == KILLED:
            half = dataclasses.replace(config.train, num_steps_limit=10)
            real_train(dataclasses.replace(config, train=half), strategy)
            raise _Killed()
        return real_train(config, strategy)

    def second_run_train(config, strategy=None):
        trained.append(pathlib.Path(config.train.checkpoint_path).name)
        return real_train(config, strategy)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(embeddings, "load_split", spying_load_split)
        patch.setattr(trainer, "train", first_run_train)
        with pytest.raises(_Killed):
            _search(data_path, search_dir)
        first_results = trials.read_results(search_dir)
        finished_files = _snapshot(trials.trial_directory(search_dir, FINISHED))
        patch.setattr(trainer, "train", second_run_train)
        outcome = _search(data_path, search_dir)
    return dict(
        data_path=data_path,
        search_dir=search_dir,
        first_results=first_results,
        finished_files=finished_files,
        outcome=outcome,
        trained=trained,
        splits=splits,
    )


@pytest.mark.slow
def test_a_killed_search_rerun_keeps_every_finished_trial_and_resumes(interrupted):
    first, outcome = interrupted["first_results"], interrupted["outcome"]
    search_dir = interrupted["search_dir"]

    assert sorted(first) == [FAILING, DIVERGING, FINISHED]
    assert interrupted["trained"] == [f"trial-{KILLED:03d}"]
    final = trials.read_results(search_dir)
    assert final == outcome.results
    assert sorted(final) == list(range(NUM_TRIALS))
    for trial in first:
        assert final[trial] == first[trial]
    assert final[KILLED]["status"] == "ok"
    assert final[KILLED]["resumed_from_step"] == 10
    assert final[KILLED]["steps"] == 20
    assert outcome.stopped_by is None
    assert (
        _snapshot(trials.trial_directory(search_dir, FINISHED))
        == interrupted["finished_files"]
    )


@pytest.mark.slow
def test_a_rerun_with_fewer_trials_ranks_every_finished_one_and_says_so(interrupted):
    lines = []
    outcome = trials.run_search(
        _base_args(interrupted["data_path"]),
        search_space.parse_space(SPACE),
        interrupted["search_dir"],
        2,
        seed=0,
        log=lines.append,
    )
    assert outcome.results == interrupted["outcome"].results  # none retrained
    assert outcome.best == interrupted["outcome"].best
    assert lines == [
        f"{interrupted['search_dir'] / trials.RESULTS_FILE} also holds 2 trial(s) "
        "beyond --num_trials=2 (up to trial-003): they are ranked with the others"
    ]


@pytest.mark.slow
def test_a_moved_search_directory_resumes_where_it_is_now(interrupted, tmp_path):
    """Copied elsewhere with its last result dropped: the trials' flagfiles
    are pointed at the copy (their one changed line), the trial is resumed
    there, nothing is written to the original, and best.cfg names the
    copy's trial."""
    original = interrupted["search_dir"]
    moved = tmp_path / "moved"
    shutil.copytree(original, moved)
    results = (moved / trials.RESULTS_FILE).read_text().splitlines()
    (moved / trials.RESULTS_FILE).write_text("\n".join(results[:-1]) + "\n")
    before = _snapshot(original)
    lines = []

    outcome = _search(interrupted["data_path"], moved, lines.append)

    assert _snapshot(original) == before
    assert lines[0] == (
        f"{moved} was moved or copied: the --checkpoint_path of 4 trial "
        "flagfile(s) now names the trial here"
    )
    for trial in range(NUM_TRIALS):
        name = trials.trial_directory(original, trial).name
        old = (original / name / "trial.cfg").read_text().splitlines()
        new = (moved / name / "trial.cfg").read_text().splitlines()
        assert [(a, b) for a, b in zip(old, new) if a != b] == [
            (
                f"--checkpoint_path={(original / name).resolve()}",
                f"--checkpoint_path={(moved / name).resolve()}",
            )
        ]
    assert sorted(outcome.results) == list(range(NUM_TRIALS))
    assert outcome.results[KILLED]["status"] == "ok"
    assert outcome.results[KILLED]["resumed_from_step"] == 20  # the copy's
    best = trials.trial_config(moved / "best.cfg")
    assert best.train.checkpoint_path == str(
        (moved / outcome.best["directory"]).resolve()
    )


@pytest.mark.slow
def test_failed_and_diverged_trials_are_recorded_with_their_reason(interrupted):
    results = interrupted["outcome"].results

    assert results[FAILING]["status"] == "failed"
    assert results[FAILING]["reason"] == "RuntimeError: injected failure"
    assert results[DIVERGING]["status"] == "diverged"
    assert "no checkpoint" in results[DIVERGING]["reason"]
    assert results[FINISHED]["status"] == "ok"
    for trial in (FINISHED, KILLED):
        directory = trials.trial_directory(interrupted["search_dir"], trial)
        best = checkpoints.best_metrics(directory)
        assert results[trial]["metavalid_accuracy"] == best["metavalid_accuracy"]
        assert results[trial]["best_step"] == best["step"]


@pytest.mark.slow
def test_the_test_split_is_never_read(interrupted):
    assert set(interrupted["splits"]) == {"train", "val"}


@pytest.mark.slow
def test_trial_values_are_a_pure_function_of_the_seed_and_trial_index(interrupted):
    space = search_space.parse_space(SPACE)
    draws = [search_space.draw_trial(space, 0, trial) for trial in range(NUM_TRIALS)]

    assert draws == [search_space.draw_trial(space, 0, t) for t in range(NUM_TRIALS)]
    assert draws[0] != draws[1]
    assert draws[0] != search_space.draw_trial(space, 1, 0)
    for trial, record in interrupted["outcome"].results.items():
        expected = {d.flag: d.value(draws[trial][d.flag]) for d in space}
        assert record["hparams"] == expected
        config = trials.trial_config(
            trials.trial_directory(interrupted["search_dir"], trial) / "trial.cfg"
        )
        assert config.optimizer.outer_lr == expected["outer_lr"]
        assert config.model.dropout_rate == expected["dropout_rate"]
        assert config.model.num_latents == expected["num_latents"]
        assert 1e-4 <= expected["outer_lr"] < 1e-2
        assert expected["finetuning_unroll_length"] in range(4)


def _trained_config(directory):
    """The configuration the trainer recorded in a run directory."""
    saved = json.loads((directory / checkpoints.CONFIG_FILE).read_text())
    del saved["embedding_dim"]
    return saved


@pytest.mark.slow
def test_each_trial_flagfile_holds_the_configuration_it_trained(interrupted):
    for trial in (FINISHED, KILLED):
        directory = trials.trial_directory(interrupted["search_dir"], trial)
        config = trials.trial_config(directory / "trial.cfg")

        assert config.to_dict() == _trained_config(directory)
        assert config.train.checkpoint_path == str(directory.resolve())


@pytest.mark.slow
def test_best_cfg_reproduces_the_winning_trial(interrupted):
    results = interrupted["outcome"].results
    winner = max(
        (r for r in results.values() if r["status"] == "ok"),
        key=lambda r: r["metavalid_accuracy"],
    )
    directory = interrupted["search_dir"] / winner["directory"]

    config = trials.trial_config(interrupted["search_dir"] / "best.cfg")

    assert interrupted["outcome"].best == winner
    assert config.to_dict() == _trained_config(directory)
    assert config.optimizer.outer_lr == winner["hparams"]["outer_lr"]


def _plugin_values(directory, plugin):
    """(tag, Summary.Value) of every summary of `plugin` in directory's events."""
    found = []
    for path in sorted(pathlib.Path(directory).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == plugin:
                    found.append((value.tag, value))
    return found


def _hparams_data(directory):
    return [
        plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
        for _, value in _plugin_values(directory, "hparams")
    ]


@pytest.mark.slow
def test_the_hparams_dashboard_summaries_are_written(interrupted):
    search_dir = interrupted["search_dir"]
    experiments = [d for d in _hparams_data(search_dir) if d.HasField("experiment")]

    assert len(experiments) == 1
    experiment = experiments[0].experiment
    assert [h.name for h in experiment.hparam_infos] == [
        entry.split(":")[0] for entry in SPACE
    ]
    assert trials.OBJECTIVE_TAG in [m.name.tag for m in experiment.metric_infos]
    for trial, record in interrupted["outcome"].results.items():
        directory = trials.trial_directory(search_dir, trial)
        sessions = [
            d.session_start_info
            for d in _hparams_data(directory)
            if d.HasField("session_start_info")
        ]
        assert len(sessions) == 1
        assert {
            name: value.number_value for name, value in sessions[0].hparams.items()
        } == {name: float(v) for name, v in record["hparams"].items()}
        objective = [
            tf.make_ndarray(value.tensor)
            for tag, value in _plugin_values(directory, "scalars")
            if tag == trials.OBJECTIVE_TAG
        ]
        if record["status"] == "ok":
            np.testing.assert_allclose(objective, [record["metavalid_accuracy"]])
        else:
            assert not objective


@pytest.mark.slow
def test_a_changed_command_refuses_the_directory_of_another_search(interrupted):
    search_dir = interrupted["search_dir"]
    before = _snapshot(search_dir)
    args = [*_base_args(interrupted["data_path"]), "--kl_weight=0.5"]

    with pytest.raises(search_space.SearchError) as error:
        trials.run_search(args, search_space.parse_space(SPACE), search_dir, 1, seed=0)

    message = str(error.value)
    assert "trial-000/trial.cfg: made by another search" in message
    assert "--kl_weight=0.5" in message and "\n" not in message
    assert _snapshot(search_dir) == before


@pytest.mark.slow
def test_a_rerun_may_change_the_flags_that_do_not_change_a_trial(tmp_path, monkeypatch):
    """A finished one-trial search rerun with another meta-test size and
    summary interval: nothing retrains or is rewritten, and --evaluate_best
    meta-tests with the new values; another tower count is refused, naming
    the flag, as is a boolean flag turned on."""
    data_path = data_fixtures.write_toy_dataset(tmp_path / "data")
    search_dir = tmp_path / "search"
    space = search_space.parse_space(SPACE)
    trials.run_search(
        _base_args(data_path), space, search_dir, 1, seed=0, log=lambda line: None
    )

    def contents():  # best.cfg is rewritten, the same, by every run
        return {name: data for name, (data, _) in _snapshot(search_dir).items()}

    before = contents()
    changed = ["--num_metatest_episodes=1000", "--summary_steps=5"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished trial trained again")

    evaluated = []
    monkeypatch.setattr(trainer, "train", no_training)
    monkeypatch.setattr(evaluation, "evaluate", lambda config: evaluated.append(config))
    monkeypatch.setattr(evaluation, "result_line", lambda results: "")
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        search.run(
            [
                "leo_tf.search",
                *_base_args(data_path),
                *changed,
                f"--search_dir={search_dir}",
                "--num_trials=1",
                *[f"--space={entry}" for entry in SPACE],
                "--evaluate_best",
            ]
        )
    assert exit_info.value.code in (None, 0)  # success
    assert contents() == before
    [config] = evaluated
    assert config.train.num_metatest_episodes == 1000
    assert config.train.summary_steps == 5
    assert config.train.checkpoint_path == str(search_dir.resolve() / "trial-000")

    for flag, named in [
        ("--num_towers=1", "--num_towers=1 now"),
        (
            "--allow_split_overlap",
            "--noallow_split_overlap here, --allow_split_overlap now",
        ),
    ]:
        with pytest.raises(search_space.SearchError) as error:
            trials.run_search(
                [*_base_args(data_path), flag], space, search_dir, 1, seed=0
            )
        assert named in str(error.value), str(error.value)
    assert contents() == before


def test_a_test_split_the_winner_cannot_be_tested_on_is_refused_before_any_trial(
    tmp_path,
):
    data_path = data_fixtures.write_toy_dataset(tmp_path / "data")
    test_file = data_path / "toy" / "center" / "test_embeddings.pkl"
    test_file.unlink()
    search_dir = tmp_path / "search"
    with pytest.raises(embeddings.DataError) as error:
        _search(data_path, search_dir, evaluate_best=True)
    assert str(test_file) in str(error.value)
    assert not search_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "training run"])
def test_a_file_or_a_training_run_as_search_dir_is_refused(interrupted, tmp_path, kind):
    search_dir = tmp_path / "target"
    if kind == "file":
        search_dir.write_text("notes")
        expected = f"--search_dir={search_dir}: not a directory"
    else:
        shutil.copytree(interrupted["search_dir"] / "trial-002", search_dir)
        expected = f"--search_dir={search_dir}: a leo_tf.train run directory"
    before = _snapshot(tmp_path)
    with pytest.raises(search_space.SearchError, match=re.escape(expected)):
        trials.run_search(
            _base_args(interrupted["data_path"]),
            search_space.parse_space(SPACE),
            search_dir,
            1,
            seed=0,
        )
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "entry, problem",
    [
        ("outer_lr", "expected FLAG:KIND:..."),
        ("learning_rate:uniform:0:1", "learning_rate is not a flag of leo_tf.train"),
        ("checkpoint_path:choice:a,b", "--checkpoint_path is set by the search"),
        ("outer_lr:normal:0:1", "normal is not a kind of draw"),
        ("num_latents:uniform:8:64", "--num_latents can be searched by int, choice"),
        ("dropout_rate:int:0:1", "--dropout_rate can be searched by loguniform, "),
        ("outer_lr:loguniform:0:1e-3", "loguniform needs 0 < LOW"),
        ("outer_lr:uniform:1e-3:1e-4", "needs finite LOW < HIGH"),
        ("outer_lr:uniform:1e-3", "uniform takes LOW:HIGH"),
        ("num_latents:int:8:6.5", "LOW and HIGH must be integers"),
        ("num_latents:choice:8,,16", "choice takes V1,V2,... with no empty value"),
        ("num_latents:choice:8,many", "'many' is not a valid value"),
    ],
)
def test_bad_space_entries_are_named_in_one_line(entry, problem):
    with pytest.raises(search_space.SearchError) as error:
        search_space.parse_space([entry])

    assert str(error.value).startswith(f"--space={entry}: {problem}")
    assert "\n" not in str(error.value)


def test_space_values_invalid_for_training_fail_before_anything_is_written(
    toy_data, tmp_path
):
    space = search_space.parse_space(
        ["outer_lr:loguniform:1e-4:1e-3", "dropout_rate:uniform:0:1"]
    )

    with pytest.raises(search_space.SearchError) as error:
        trials.run_search(_base_args(toy_data), space, tmp_path / "s", 2, seed=0)

    assert str(error.value).startswith(
        "--space=dropout_rate:uniform:0:1: --dropout_rate=1.0: must be 0 or in"
    )
    assert not (tmp_path / "s").exists()


def test_evaluation_mode_is_refused_saying_how_to_evaluate(tmp_path):
    """A search would ignore it and train; refused before anything is written."""
    process = run_fixtures.run_module(
        "leo_tf.search",
        "--flagfile=flags/quickstart.cfg",
        f"--search_dir={tmp_path / 's'}",
        "--evaluation_mode",
    )
    assert process.returncode == 1
    assert process.stderr.strip().splitlines()[-1] == (
        "leo_tf.search: error: --evaluation_mode: a search trains its trials; to "
        "meta-test the best one, add --evaluate_best to the search, or run "
        f"`python -m leo_tf.train --flagfile={tmp_path / 's'}/best.cfg "
        "--evaluation_mode`"
    )
    assert not (tmp_path / "s").exists()


def test_the_results_table_ranks_trials_by_directory_name_with_their_reasons():
    results = {
        0: dict(
            trial=0,
            directory="trial-000",
            status="failed",
            reason="ValueError: bad",
            wall_s=1.0,
            hparams={"outer_lr": 1e-3},
        ),
        1: dict(
            trial=1,
            directory="trial-001",
            status="ok",
            metavalid_accuracy=0.91234,
            best_step=20,
            steps=20,
            wall_s=65.0,
            hparams={"outer_lr": 0.00042},
        ),
    }
    assert trials.results_table(results).splitlines() == [
        "rank  trial      status  metavalid  best step  steps  wall   outer_lr",
        "1     trial-001  ok      0.9123     20         20     1m05s  0.00042",
        "2     trial-000  failed  -          -          -      0m01s  0.001",
        "trial-000 failed: ValueError: bad",
    ]


def test_a_tilde_in_the_data_path_is_the_home_directory(monkeypatch, tmp_path):
    """As leo_tf.train expands it: the flagfile holds the absolute path."""
    monkeypatch.setenv("HOME", str(tmp_path))
    lines = trials.trial_flag_lines(["--data_path=~/emb"], {}, tmp_path / "t")
    assert f"--data_path={tmp_path / 'emb'}" in lines


def test_a_flag_searched_twice_is_refused():
    with pytest.raises(search_space.SearchError, match="--outer_lr is searched twice"):
        search_space.parse_space(["outer_lr:uniform:0.1:1", "outer_lr:choice:0.1"])


def _search_training_with(train, tmp_path, monkeypatch, log):
    """A search on fresh toy data whose trials train with `train`; (its
    outcome, the data path, the search directory)."""
    data_path = data_fixtures.write_toy_dataset(tmp_path / "data")
    search_dir = tmp_path / "search"
    monkeypatch.setattr(trainer, "train", train)
    return _search(data_path, search_dir, log), data_path, search_dir


def test_a_signal_stops_the_search_after_the_trial_saves_and_the_command_says_so(
    tmp_path, monkeypatch, capsys
):
    """A stopped trial is not recorded; the outcome names the signal, and the
    command ends with its `stopped:` line and 128 + the signal's number."""
    lines = []

    def stopped_train(config, strategy=None):
        del config, strategy
        return {"step": 10, "stopped_by": "SIGTERM", "saved": True}

    outcome, data_path, search_dir = _search_training_with(
        stopped_train, tmp_path, monkeypatch, lines.append
    )
    assert outcome.stopped_by == "SIGTERM"
    assert outcome.results == {} and trials.read_results(search_dir) == {}
    assert (
        lines[-1] == "trial-000: stopped by SIGTERM; rerun the same command to resume"
    )

    monkeypatch.setattr(trials, "run_search", lambda *args, **kwargs: outcome)
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        search.run(
            ["leo_tf.search", *_base_args(data_path), f"--search_dir={search_dir}"]
        )
    assert exit_info.value.code == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "leo_tf.search: stopped: SIGTERM: trial-000: checkpoint of step 10 of 20 "
        "saved; rerun the same command to resume"
    )


def test_a_signal_at_a_trials_last_step_records_it_then_stops(tmp_path, monkeypatch):
    """The trial finished: it is recorded (a rerun does not train it again),
    and the search stops before the next."""

    def finished_train(config, strategy=None):
        del strategy
        return {
            "step": config.train.num_steps_limit,
            "stopped_by": "SIGINT",
            "saved": True,
        }

    outcome, _, search_dir = _search_training_with(
        finished_train, tmp_path, monkeypatch, lambda line: None
    )
    assert outcome.stopped_by == "SIGINT"
    assert outcome.stop_message == (
        "trial-000 finished and recorded; rerun the same command to go on with "
        "the search"
    )
    assert list(outcome.results) == [0] and outcome.results[0]["steps"] == 20
    assert list(trials.read_results(search_dir)) == [0]
