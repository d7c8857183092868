"""SavedModel export: same logits out of process, metadata, errors, atomicity."""

import dataclasses
import errno
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from leo_tf import checkpoints, evaluation, trainer, uncertainty
from leo_tf import export as export_lib
from leo_tf.data import meta_dataset
from leo_tf.model import LEO
from tests import run_fixtures

DIM = 16


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory):
    """A briefly trained run directory and its SavedModel export."""
    root = tmp_path_factory.mktemp("export")
    config = run_fixtures.toy_run_config(toy_data, root / "run")
    trainer.train(config)
    export_dir = export_lib.export(config.train.checkpoint_path, root / "exported")
    return config, export_dir


@pytest.fixture(scope="module")
def loaded(trained):
    """The exported SavedModel, loaded."""
    return tf.saved_model.load(str(trained[1]))


def _restored_model(config):
    """The best checkpoint in-process, as --evaluation_mode restores it."""
    saved = json.loads(
        (pathlib.Path(config.train.checkpoint_path) / "config.json").read_text()
    )
    model = LEO(config.model, saved["embedding_dim"])
    prefix = tf.train.latest_checkpoint(
        str(pathlib.Path(config.train.checkpoint_path) / "best_checkpoint")
    )
    tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
    return model


def _in_process_logits(model, support, query):
    support = tf.math.l2_normalize(support, axis=-1)
    query = tf.math.l2_normalize(query, axis=-1)
    classes, shots = support.shape[:2]
    labels = np.broadcast_to(np.arange(classes)[:, None, None], (classes, shots, 1))
    adaptation = model.adapt(support[None], labels[None].astype(np.int32))
    return model.predict(query[None, None], adaptation.class_weights)[0, 0].numpy()


_LOADER = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    tasks = np.load(sys.argv[2])
    serving = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    outputs = {}
    for name in sorted({k.split("/")[0] for k in tasks.files}):
        result = serving(support=tf.constant(tasks[name + "/support"]),
                         query=tf.constant(tasks[name + "/query"]))
        outputs[name + "/logits"] = result["logits"].numpy()
        outputs[name + "/probabilities"] = result["probabilities"].numpy()
    np.savez(sys.argv[3], **outputs)
    assert not any(m.startswith("leo_tf") for m in sys.modules), "imported leo_tf"
    print("ok")
    """)


@pytest.mark.slow
def test_saved_model_out_of_process_matches_in_process_model(trained, tmp_path):
    config, export_dir = trained
    rng = np.random.default_rng(0)
    # (N, K, M): training used 5-way 1-shot; the others were never seen.
    shapes = {"a": (5, 1, 75), "b": (3, 2, 7), "c": (10, 3, 4), "d": (2, 5, 1)}
    tasks = {}
    for name, (classes, shots, queries) in shapes.items():
        tasks[name + "/support"] = rng.normal(size=(classes, shots, DIM)).astype(
            np.float32
        )
        tasks[name + "/query"] = rng.normal(size=(queries, DIM)).astype(np.float32)
    np.savez(tmp_path / "tasks.npz", **tasks)
    script = tmp_path / "load.py"
    script.write_text(_LOADER)
    # A working directory without leo_tf on the path.
    process = run_fixtures.run_command(
        [
            sys.executable,
            str(script),
            str(export_dir),
            str(tmp_path / "tasks.npz"),
            str(tmp_path / "out.npz"),
        ],
        env={"PYTHONPATH": None},
        cwd=tmp_path,
    )
    assert process.returncode == 0, process.stderr
    outputs = np.load(tmp_path / "out.npz")
    model = _restored_model(config)
    for name, (classes, shots, queries) in shapes.items():
        expected = _in_process_logits(
            model, tasks[name + "/support"], tasks[name + "/query"]
        )
        logits = outputs[name + "/logits"]
        assert logits.shape == (queries, classes)
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            outputs[name + "/probabilities"].sum(-1), 1.0, rtol=1e-5
        )


def test_saved_model_accuracy_equals_evaluation_mode(trained):
    config, export_dir = trained
    results = evaluation.evaluate(config)
    serving = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    classes = meta_dataset.load_classes(config.data, "test")
    sampler = meta_dataset.eval_sampler(config.data, classes, "test", config.train.seed)
    correct = total = 0
    for index in range(results["num_episodes"] // config.data.metatest_batch_size):
        batch = sampler.sample(index)
        for episode in range(batch.tr_input.shape[0]):
            query = batch.val_input[episode].reshape(-1, DIM)
            labels = batch.val_output[episode].reshape(-1)
            logits = serving(
                support=tf.constant(batch.tr_input[episode]), query=tf.constant(query)
            )["logits"].numpy()
            correct += int(np.sum(logits.argmax(-1) == labels))
            total += labels.size
    assert results["num_episodes"] == 200
    # Per-episode accuracies are float32 in the eval step.
    assert correct / total == pytest.approx(results["accuracy"], abs=1e-6)


def test_metadata_signature_and_asset(trained):
    config, export_dir = trained
    loaded = tf.saved_model.load(str(export_dir))
    metadata = {k: v.numpy() for k, v in loaded.signatures["metadata"]().items()}
    assert metadata["embedding_dim"] == DIM
    assert metadata["inner_unroll_length"] == config.model.inner_unroll_length
    assert metadata["finetuning_unroll_length"] == config.model.finetuning_unroll_length
    best = json.loads(
        (
            pathlib.Path(config.train.checkpoint_path)
            / "best_checkpoint"
            / "metrics.json"
        ).read_text()
    )
    assert metadata["checkpoint_step"] == best["step"]
    training = json.loads(metadata["training_config_json"].decode())
    assert training["model"] == dataclasses.asdict(config.model)
    asset = json.loads((export_dir / "assets" / "leo_metadata.json").read_text())
    assert asset["embedding_dim"] == DIM
    assert asset["training_config"]["data"]["dataset_name"] == "toy"


def _saved_model_cli(command, export_dir, *args):
    """TensorFlow's saved_model_cli `command` on the serving_default
    signature of the SavedModel in `export_dir`: the CompletedProcess."""
    cli = pathlib.Path(sys.executable).with_name("saved_model_cli")
    return run_fixtures.run_command(
        [
            str(cli),
            command,
            "--dir",
            str(export_dir),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            *args,
        ],
        timeout=120,
    )


@pytest.mark.slow
def test_saved_model_cli_shows_the_promised_signature(trained):
    _, export_dir = trained
    process = _saved_model_cli("show", export_dir)
    assert process.returncode == 0, process.stderr
    text = " ".join(process.stdout.split())
    # D is dynamic in the signature; the serving function checks it.
    assert "inputs['support'] tensor_info: dtype: DT_FLOAT shape: (-1, -1, -1)" in text
    assert "inputs['query'] tensor_info: dtype: DT_FLOAT shape: (-1, -1)" in text
    assert "outputs['logits'] tensor_info: dtype: DT_FLOAT shape: (-1, -1)" in text
    assert (
        "outputs['probabilities'] tensor_info: dtype: DT_FLOAT shape: (-1, -1)" in text
    )


@pytest.mark.slow
def test_saved_model_cli_runs_the_signature_as_tensorflow_serving_loads_it(
    trained, loaded, tmp_path
):
    """`saved_model_cli run` loads the SavedModel as TensorFlow Serving does
    (a TF1 session and the SavedModel's restore op, not tf.saved_model.load):
    every variable must be restored, and the answers equal the loaded
    model's."""
    _, export_dir = trained
    rng = np.random.default_rng(3)
    inputs = {
        "support": rng.standard_normal((5, 2, DIM)).astype(np.float32),
        "query": rng.standard_normal((4, DIM)).astype(np.float32),
    }
    for name, value in inputs.items():
        np.save(tmp_path / f"{name}.npy", value)
    process = _saved_model_cli(
        "run",
        export_dir,
        "--inputs",
        ";".join(f"{name}={tmp_path / name}.npy" for name in inputs),
        "--outdir",
        str(tmp_path / "out"),
    )
    assert process.returncode == 0, process.stderr[-3000:]
    expected = loaded.signatures["serving_default"](
        **{name: tf.constant(value) for name, value in inputs.items()}
    )
    for key in ("logits", "probabilities"):
        np.testing.assert_allclose(
            np.load(tmp_path / "out" / f"{key}.npy"),
            expected[key].numpy(),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize(
    "support_shape,query_shape,corrupt,message",
    [
        (
            (5, 1, DIM + 1),
            (3, DIM),
            None,
            "support: expected embeddings of D=16, got 17",
        ),
        ((5, 1, DIM), (3, DIM - 1), None, "query: expected embeddings of D=16, got 15"),
        ((5, 1, DIM), (3, 2, DIM), None, "query [3,2,16] is not compatible"),
        ((0, 1, DIM), (3, DIM), None, "support: N (classes) must be at least 1"),
        ((5, 0, DIM), (3, DIM), None, "support: K (examples per class) must be"),
        ((5, 1, DIM), (3, DIM), "support", "support: contains NaN or Inf"),
        ((5, 1, DIM), (3, DIM), "query", "query: contains NaN or Inf"),
    ],
)
def test_bad_inputs_raise_errors_naming_the_problem(
    loaded, support_shape, query_shape, corrupt, message
):
    serving = loaded.signatures["serving_default"]
    inputs = {
        "support": np.ones(support_shape, np.float32),
        "query": np.ones(query_shape, np.float32),
    }
    if corrupt:
        inputs[corrupt].flat[0] = np.nan
    with pytest.raises(
        (tf.errors.InvalidArgumentError, ValueError, TypeError)
    ) as error:
        serving(**{k: tf.constant(v) for k, v in inputs.items()})
    assert message in str(error.value)


def _run_export_command(*args):
    """The exit status of `leo_tf.export args...`, run in this process."""
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        with pytest.raises(SystemExit) as exit_info:
            export_lib.run(["leo_tf.export", *args])
    flags.FLAGS.unparse_flags()
    return exit_info.value.code


def test_cli_refuses_what_overwrite_must_not_replace(trained, tmp_path, capsys):
    config, export_dir = trained
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    previous = tmp_path / "previous"
    shutil.copytree(export_dir, previous)
    for target, overwrite, message in [
        (
            foreign,
            ["--overwrite"],
            "not empty and not a SavedModel (holds keep.txt); --overwrite "
            "replaces only a previous SavedModel",
        ),
        (previous, [], "holds a previous SavedModel (pass --overwrite to replace it)"),
    ]:
        before = _tree(target)
        status = _run_export_command(
            f"--checkpoint_path={config.train.checkpoint_path}",
            f"--export_dir={target}",
            *overwrite,
        )
        assert status != 0
        assert f"--export_dir={target}: {message}" in capsys.readouterr().err
        assert _tree(target) == before

    export_lib.export(config.train.checkpoint_path, previous, overwrite=True)
    assert (previous / "saved_model.pb").read_bytes() != before["saved_model.pb"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "previous"]


def _tree(directory):
    """{relative path: bytes, or None for a directory} under `directory`."""
    directory = pathlib.Path(directory)
    return {
        str(path.relative_to(directory)): None if path.is_dir() else path.read_bytes()
        for path in sorted(directory.rglob("*"))
    }


@pytest.mark.slow
def test_disk_full_leaves_nothing_half_written(trained, tmp_path, monkeypatch):
    config, _ = trained
    previous = tmp_path / "exported"
    export_lib.export(config.train.checkpoint_path, previous)
    before = _tree(previous)

    def failing_save(module, directory, **kwargs):
        (pathlib.Path(directory) / "saved_model.pb").write_text("partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tf.saved_model, "save", failing_save)
    for target, overwrite in [(previous, True), (tmp_path / "fresh", False)]:
        with pytest.raises(export_lib.ExportError) as error:
            export_lib.export(config.train.checkpoint_path, target, overwrite=overwrite)
        assert str(error.value) == (
            f"--export_dir={target}: cannot write the SavedModel: "
            "[Errno 28] No space left on device"
        )
    monkeypatch.undo()

    # The disk fills (or turns read-only) as the new export is renamed in.
    real_replace = os.replace

    def failing_rename(source, destination):
        if ".tmp-" in pathlib.Path(source).name:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", failing_rename)
    with pytest.raises(
        export_lib.ExportError,
        match=r"cannot write the SavedModel: \[Errno 30\] Read-only file system",
    ):
        export_lib.export(config.train.checkpoint_path, previous, overwrite=True)
    monkeypatch.undo()

    assert _tree(previous) == before
    # The previous export still serves, with the trained model's logits.
    rng = np.random.default_rng(0)
    support = rng.standard_normal((3, 2, DIM)).astype(np.float32)
    query = rng.standard_normal((4, DIM)).astype(np.float32)
    serving = tf.saved_model.load(str(previous)).signatures["serving_default"]
    np.testing.assert_allclose(
        serving(support=support, query=query)["logits"].numpy(),
        _in_process_logits(_restored_model(config), support, query),
        rtol=1e-5,
        atol=1e-5,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def test_export_errors_name_the_flag(tmp_path):
    with pytest.raises(
        export_lib.ExportError, match="--checkpoint_path=.*: not a directory"
    ):
        export_lib.export(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(export_lib.ExportError, match="no config.json"):
        export_lib.export(tmp_path / "empty", tmp_path / "out")


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run and its data under tmp_path/src, its
    config.json naming the copied data."""
    config, _ = trained
    source = tmp_path / "src"
    run = source / "run"
    shutil.copytree(config.train.checkpoint_path, run, symlinks=True)
    shutil.copytree(config.data.data_path, source / "data")
    saved = json.loads((run / "config.json").read_text())
    saved["data"]["data_path"] = str(source / "data")
    (run / "config.json").write_text(json.dumps(saved))
    return run


@pytest.mark.parametrize(
    "export_dir,relation,source",
    [
        ("src/run", "is", "the checkpoint path"),
        ("src", "contains", "the checkpoint path"),
        (".", "contains", "the checkpoint path"),
        ("src/run/exported", "lies inside", "the checkpoint path"),
        ("src/run/.best", "lies inside", "the checkpoint path"),
        ("link-to-run", "is", "the checkpoint path"),
        ("link-to-run/../run", "is", "the checkpoint path"),
        ("src/data", "is", "the run's data path"),
        ("src/data/toy/center", "lies inside", "the run's data path"),
    ],
)
def test_export_never_touches_its_sources(
    run_copy, tmp_path, monkeypatch, export_dir, relation, source
):
    (tmp_path / "link-to-run").symlink_to(run_copy)
    monkeypatch.chdir(tmp_path)  # export_dir and --checkpoint_path relative
    before = _tree(tmp_path / "src")
    with pytest.raises(export_lib.ExportError) as error:
        export_lib.export("src/run", export_dir, overwrite=True)
    assert str(error.value).startswith(
        f"--export_dir={pathlib.Path(export_dir)}: {relation} {source} "
    )
    assert str(error.value).endswith(
        "; an export must not touch its sources, choose a directory outside it"
    )
    assert _tree(tmp_path / "src") == before


def test_a_remote_checkpoint_prefix_is_outside_a_local_run(run_copy):
    tf.io.gfile.makedirs("ram://other_run")
    with tf.io.gfile.GFile("ram://other_run/ckpt-1.index", "wb") as index:
        index.write(b"an index")
    with pytest.raises(export_lib.ExportError) as error:
        export_lib.check_checkpoint_prefix("ram://other_run/ckpt-1", run_copy)
    assert str(error.value).startswith(
        f"--checkpoint=ram://other_run/ckpt-1: not a checkpoint of "
        f"--checkpoint_path={run_copy} (ram://other_run is outside it)"
    )


@pytest.mark.slow
def test_the_command_expands_a_leading_tilde_in_its_paths(run_copy, tmp_path):
    """--checkpoint_path=~/... and --export_dir=~/... with HOME at tmp_path."""
    process = run_fixtures.run_module(
        "leo_tf.export",
        "--checkpoint_path=~/src/run",
        "--export_dir=~/model",
        env={"HOME": str(tmp_path)},
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.strip() == f"SavedModel written to {tmp_path / 'model'}"
    assert (tmp_path / "model" / "saved_model.pb").is_file()


def test_an_explicit_checkpoint_outside_the_run_directory_is_refused(
    run_copy, tmp_path
):
    """Its weights would go out with the run's config.json as their training
    configuration (another run's, for all the export can tell)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for path in run_copy.glob("ckpt-10.*"):
        shutil.copy(path, elsewhere)
    before = _tree(tmp_path)
    prefix = elsewhere / "ckpt-10"
    with pytest.raises(export_lib.ExportError) as error:
        export_lib.export(run_copy, tmp_path / "model", which=str(prefix))
    assert str(error.value) == (
        f"--checkpoint={prefix}: not a checkpoint of --checkpoint_path={run_copy} "
        f"({elsewhere.resolve()} is outside it), whose config.json the SavedModel "
        "would record as its training configuration; pass the directory of the "
        "run that wrote it as --checkpoint_path"
    )
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("kind", ["a regular file", "a socket"])
def test_export_dir_that_is_not_a_directory_is_refused(trained, tmp_path, kind):
    config, _ = trained
    target = tmp_path / "model"
    if kind == "a socket":  # not a FIFO: removing one might block on opening it
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(target))
        listener.close()
    else:
        target.write_text("notes")
    with pytest.raises(export_lib.ExportError) as error:
        export_lib.export(config.train.checkpoint_path, target, overwrite=True)
    assert str(error.value) == f"--export_dir={target}: is {kind}, not a directory"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no .model.old-*
    if kind == "a regular file":
        assert target.read_text() == "notes"


def _overwrite_refusal(config, target):
    """The message of an export with --overwrite into `target`, which must
    refuse and leave `target` as it was."""
    before = _tree(target)
    with pytest.raises(export_lib.ExportError) as error:
        export_lib.export(config.train.checkpoint_path, target, overwrite=True)
    assert _tree(target) == before
    return str(error.value)


def test_overwrite_replaces_only_a_previous_saved_model(trained, tmp_path):
    config, _ = trained
    target = tmp_path / "model"
    (target / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "c.txt"):
        (target / name).write_text(name)
    assert _overwrite_refusal(config, target) == (
        f"--export_dir={target}: not empty and not a SavedModel (holds a.txt, "
        "b.txt, c.txt and 1 more); --overwrite replaces only a previous SavedModel"
    )


def test_overwrite_keeps_a_saved_model_holding_other_files(trained, tmp_path):
    config, export_dir = trained
    target = tmp_path / "model"
    shutil.copytree(export_dir, target)
    (target / "notes.txt").write_text("mine")
    assert _overwrite_refusal(config, target) == (
        f"--export_dir={target}: holds a SavedModel and also notes.txt; "
        "--overwrite replaces only a previous SavedModel"
    )


def _dead_pid():
    """The pid of a process that has exited."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_leftovers_of_killed_exports_are_removed(trained, tmp_path):
    config, export_dir = trained
    shutil.copytree(export_dir, tmp_path / "model")
    dead, live = _dead_pid(), os.getppid()
    for name in [
        ".model.tmp-k3x_9a0b",  # made before staging names carried a pid
        f".model.tmp-{dead}-k3x_9a0b",
        f".model.old-{dead}",
        f".model.tmp-{live}-k3x_9a0b",  # a concurrent export's
        f".model.old-{live}",
        ".model.tmp-mine",  # not a name an export makes
        ".other.tmp-k3x_9a0b",
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "variables").mkdir()
    (tmp_path / f".model.old-{dead}" / "saved_model.pb").write_text("older")
    export_lib.export(config.train.checkpoint_path, tmp_path / "model", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            f".model.old-{live}",
            ".model.tmp-mine",
            f".model.tmp-{live}-k3x_9a0b",
            "model",
            ".other.tmp-k3x_9a0b",
        ]
    )
    assert (tmp_path / "model" / "saved_model.pb").exists()


def test_previous_export_retired_by_a_killed_export_is_restored(trained, tmp_path):
    config, export_dir = trained
    retired = tmp_path / f".model.old-{_dead_pid()}"
    shutil.copytree(export_dir, retired)
    before = _tree(retired)
    with pytest.raises(
        export_lib.ExportError, match="model: holds a previous SavedModel"
    ):
        export_lib.export(config.train.checkpoint_path, tmp_path / "model")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert _tree(tmp_path / "model") == before


def _promoting(monkeypatch, run, promotions):
    """Makes the i-th resolution of the best checkpoint run the i-th list of
    `promotions` (pairs: checkpoint step, best record's step), as a trainer
    might meanwhile, before the export reads what it resolved."""
    resolve = checkpoints.best_checkpoint_prefix
    pending = list(promotions)

    def racing(directory):
        prefix = resolve(directory)
        for step, record_step in pending.pop(0) if pending else []:
            checkpoints.promote_to_best(
                run, run / f"ckpt-{step}", {"step": record_step}
            )
        return prefix

    monkeypatch.setattr(checkpoints, "best_checkpoint_prefix", racing)


def _exported_metadata(export_dir):
    return json.loads((export_dir / "assets" / "leo_metadata.json").read_text())


def test_export_reads_the_best_checkpoint_it_resolved_through_a_promotion(
    run_copy, tmp_path, monkeypatch
):
    resolved = checkpoints.best_checkpoint_prefix(run_copy)
    _promoting(monkeypatch, run_copy, [[(10, 11)]])
    export_lib.export(run_copy, tmp_path / "model")
    # A promotion keeps the previous best readable: the export reads it.
    assert _exported_metadata(tmp_path / "model")["checkpoint"] == resolved


def test_export_resolves_again_when_the_best_checkpoint_vanishes(
    run_copy, tmp_path, monkeypatch
):
    # Two promotions while the export reads: the second removes what it resolved.
    _promoting(monkeypatch, run_copy, [[(10, 11), (10, 12)]])
    export_lib.export(run_copy, tmp_path / "model")
    metadata = _exported_metadata(tmp_path / "model")
    assert metadata["checkpoint_step"] == 10
    assert metadata["checkpoint"] == str(run_copy.resolve() / ".best/step-12/ckpt-10")


def test_export_gives_up_on_a_best_checkpoint_that_keeps_changing(
    run_copy, tmp_path, monkeypatch
):
    _promoting(
        monkeypatch,
        run_copy,
        [[(10, 11), (10, 12)], [(20, 21), (20, 22)], [(10, 13), (10, 14)]],
    )
    with pytest.raises(checkpoints.CheckpointError) as error:
        export_lib.export(run_copy, tmp_path / "model")
    assert re.fullmatch(
        f"--checkpoint_path={run_copy}: the best checkpoint was replaced while "
        rf"being read, 3 times in a row \(last {run_copy.resolve()}/\.best/"
        r"step-22/ckpt-20\); try again",
        str(error.value),
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_export_falls_back_from_a_damaged_best_to_the_latest_intact(
    run_copy, tmp_path, caplog
):
    damaged = pathlib.Path(
        f"{checkpoints.best_checkpoint_prefix(run_copy)}.data-00000-of-00001"
    )
    damaged.write_bytes(damaged.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        export_lib.export(run_copy, tmp_path / "model")
    assert f"best_checkpoint unusable, {damaged}: damaged (" in caplog.text
    assert "exporting the latest intact checkpoint instead" in caplog.text
    metadata = _exported_metadata(tmp_path / "model")
    assert metadata["checkpoint"] == str(run_copy.resolve() / "ckpt-20")
    assert metadata["checkpoint_step"] == 20


def test_a_checkpoint_prefix_that_does_not_exist_is_named_first(
    run_copy, tmp_path, monkeypatch
):
    """Relative to the working directory, as a path is: a bare ckpt-77 there
    is no checkpoint, whatever --export_dir is."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(export_lib.ExportError) as error:
        export_lib.export(run_copy, tmp_path / "exp", which="ckpt-77")
    assert str(error.value) == (
        "--checkpoint=ckpt-77: no such checkpoint (ckpt-77.index); a prefix is "
        f"a path, e.g. {run_copy / 'ckpt-1000'}"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_unreadable_checkpoint_is_named(run_copy, tmp_path):
    (run_copy / "ckpt-10.index").write_bytes(b"garbage" * 10)
    with pytest.raises(
        export_lib.ExportError,
        match=r"--checkpoint=.*/ckpt-10: .*/ckpt-10\.index: damaged \(.+\)$",
    ):
        export_lib.export(run_copy, tmp_path / "model", which=str(run_copy / "ckpt-10"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_truncated_checkpoint_data_is_named(run_copy, tmp_path):
    data = run_copy / "ckpt-10.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(export_lib.ExportError) as error:
        export_lib.export(run_copy, tmp_path / "model", which=str(run_copy / "ckpt-10"))
    assert str(error.value) == (
        f"--checkpoint={run_copy / 'ckpt-10'}: "
        f"{run_copy.resolve() / 'ckpt-10.data-00000-of-00001'}: damaged (Read "
        "less bytes than requested)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_checkpoint_with_a_flipped_byte_ends_the_command_in_its_error_line(
    run_copy, tmp_path
):
    """Read back whole before the restore, as best and latest are: the
    checksum's failure names the data file, and no partial restore is left
    to warn after the error line."""
    data = run_copy / "ckpt-10.data-00000-of-00001"
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0xFF
    data.write_bytes(bytes(content))
    prefix = run_copy / "ckpt-10"
    process = run_fixtures.run_module(
        "leo_tf.export",
        f"--checkpoint_path={run_copy}",
        f"--export_dir={tmp_path / 'model'}",
        f"--checkpoint={prefix}",
    )
    assert process.returncode == 1
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"leo_tf.export: error: --checkpoint={prefix}: "
        f"{run_copy.resolve() / 'ckpt-10.data-00000-of-00001'}: damaged ("
    ), process.stderr[-3000:]
    assert "function_node" not in last
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda saved: [], r"config.json: expected a JSON object, found an array"),
        (
            lambda saved: {**saved, "model": {}},
            r"config.json: no model\.\w+ \(expected",
        ),
    ],
)
def test_malformed_config_json_is_named_before_anything_is_written(
    run_copy, tmp_path, edit, message
):
    path = run_copy / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(checkpoints.CheckpointError, match=message):
        export_lib.export(run_copy, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_config_json_without_a_data_path_still_exports(run_copy, tmp_path):
    path = run_copy / "config.json"
    saved = json.loads(path.read_text())
    del saved["data"]["data_path"]
    path.write_text(json.dumps(saved))
    exported = export_lib.export(run_copy, tmp_path / "model")
    assert (exported / "saved_model.pb").is_file()


@pytest.mark.parametrize("name", ["support", "query"])
def test_wrong_width_is_named_by_the_serve_function_too(loaded, name):
    inputs = {
        "support": np.ones((5, 1, DIM), np.float32),
        "query": np.ones((3, DIM), np.float32),
    }
    inputs[name] = np.ones(inputs[name].shape[:-1] + (DIM + 1,), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        loaded.serve(**inputs)
    assert f"{name}: expected embeddings of D=16, got 17" in error.value.message


def test_outputs_do_not_depend_on_the_scale_of_the_inputs(loaded):
    serving = loaded.signatures["serving_default"]
    rng = np.random.default_rng(1)
    support = rng.standard_normal((5, 2, DIM)).astype(np.float32)
    query = rng.standard_normal((6, DIM)).astype(np.float32)
    query[2] = 0.0  # a zero row stays zero at every scale
    expected = serving(support=support, query=query)["probabilities"].numpy()
    assert np.all(np.isfinite(expected))
    for scale in [1e20, 1e30, 1e-25, 1e-38]:
        scaled = serving(
            support=support * np.float32(scale), query=query * np.float32(scale)
        )["probabilities"].numpy()
        np.testing.assert_allclose(scaled, expected, rtol=0, atol=1e-6, err_msg=scale)


def test_rows_are_rescaled_exactly_by_powers_of_two():
    x = np.array(
        [
            [3e38, -1e30, 2.5, 0.0],  # near the float32 maximum
            [1e-40, -3e-42, 1e-45, 0.0],  # subnormal only
            [1.0, 1e-39, -1e-30, 7.0],  # entries 2^-126 below the largest -> 0
            [0.0, 0.0, 0.0, 0.0],
        ],
        np.float32,
    )
    # 2^(149 - e), e the binary exponent of the row's largest |entry| (a
    # subnormal's taken as -126): the largest lands in [2^23, 2^24).
    largest = np.abs(x.astype(np.float64)).max(-1, keepdims=True)
    exponent = np.maximum(np.frexp(largest)[1] - 1, -126)
    expected = x.astype(np.float64) * 2.0 ** (23 - exponent)
    expected[2, 1] = 0.0
    got = export_lib.scaled_by_power_of_two(tf.constant(x)).numpy()
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def _random_task(seed, classes=4, shots=2, queries=6):
    rng = np.random.default_rng(seed)
    support = rng.normal(size=(classes, shots, DIM)).astype(np.float32)
    query = rng.normal(size=(queries, DIM)).astype(np.float32)
    return tf.constant(support), tf.constant(query)


def _sampled(loaded, support, query, num_samples, seed):
    return loaded.signatures["sampled"](
        support=support,
        query=query,
        num_samples=tf.constant(num_samples, tf.int32),
        seed=tf.constant(seed, tf.int64),
    )


def test_sampled_signature_is_a_pure_function_of_its_seed(loaded):
    support, query = _random_task(0)
    first = _sampled(loaded, support, query, 8, 3)
    again = _sampled(loaded, support, query, 8, 3)
    other = _sampled(loaded, support, query, 8, 4)
    for name in ("mean_probabilities", "probability_stddev", "predictive_entropy"):
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["mean_probabilities"], other["mean_probabilities"])
    mean = first["mean_probabilities"].numpy()
    assert mean.shape == (6, 4) and first["predictive_entropy"].shape == (6,)
    np.testing.assert_allclose(mean.sum(-1), 1.0, rtol=1e-5)
    assert (first["probability_stddev"].numpy() > 0).any()  # the samples differ
    entropy = -(mean * np.log(mean)).sum(-1)
    np.testing.assert_allclose(first["predictive_entropy"], entropy, rtol=1e-4)


def test_sampled_signature_with_zero_noise_is_the_deterministic_answer(trained, loaded):
    """The served sampling equals leo_tf.uncertainty on the restored model with
    the same noise; with that noise zero, every sample is serving_default's."""
    config, _ = trained
    model = _restored_model(config)
    support, query = _random_task(1)
    unit_support = tf.math.l2_normalize(support, axis=-1)
    unit_query = tf.math.l2_normalize(query, axis=-1)
    noise = uncertainty.draw_adaptation_noise(model, support.shape, 5, 9)
    in_process = uncertainty.summarise(
        uncertainty.sampled_probabilities(model, unit_support, unit_query, *noise)
    )
    served = _sampled(loaded, support, query, 5, 9)
    np.testing.assert_allclose(
        served["mean_probabilities"], in_process["mean_probabilities"], atol=1e-5
    )
    zero = [tf.zeros_like(x) for x in noise]
    deterministic = loaded.signatures["serving_default"](support=support, query=query)
    for sample in uncertainty.sampled_probabilities(
        model, unit_support, unit_query, *zero
    ):
        np.testing.assert_allclose(
            sample, deterministic["probabilities"], rtol=1e-4, atol=1e-6
        )


def test_sampled_signature_refuses_fewer_than_one_sample(loaded):
    support, query = _random_task(2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_samples: must be"):
        _sampled(loaded, support, query, 0, 1)
