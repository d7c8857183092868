"""SavedModel export: same logits out of process, metadata, errors, atomicity."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from leo_tf import export as export_lib
from leo_tf import evaluation, trainer
from leo_tf.data import meta_dataset
from leo_tf.model import LEO
from tests import data_fixtures, run_fixtures

REPO = pathlib.Path(__file__).resolve().parents[1]
DIM = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained run directory and its SavedModel export."""
    root = tmp_path_factory.mktemp("export")
    data_path = data_fixtures.write_toy_dataset(root / "data", dim=DIM)
    config = run_fixtures.toy_run_config(data_path, root / "run")
    trainer.train(config)
    export_dir = export_lib.export(config.train.checkpoint_path, root / "exported")
    return config, export_dir


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
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    process = subprocess.run(
        [
            sys.executable,
            str(script),
            str(export_dir),
            str(tmp_path / "tasks.npz"),
            str(tmp_path / "out.npz"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
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


def test_saved_model_cli_shows_the_promised_signature(trained):
    _, export_dir = trained
    cli = pathlib.Path(sys.executable).with_name("saved_model_cli")
    process = subprocess.run(
        [
            str(cli),
            "show",
            "--dir",
            str(export_dir),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert process.returncode == 0, process.stderr
    text = " ".join(process.stdout.split())
    assert (
        f"inputs['support'] tensor_info: dtype: DT_FLOAT shape: (-1, -1, {DIM})" in text
    )
    assert f"inputs['query'] tensor_info: dtype: DT_FLOAT shape: (-1, {DIM})" in text
    assert "outputs['logits'] tensor_info: dtype: DT_FLOAT shape: (-1, -1)" in text
    assert (
        "outputs['probabilities'] tensor_info: dtype: DT_FLOAT shape: (-1, -1)" in text
    )


@pytest.mark.parametrize(
    "support_shape,query_shape,corrupt,message",
    [
        ((5, 1, DIM + 1), (3, DIM + 1), None, "shape"),
        ((0, 1, DIM), (3, DIM), None, "support: N (classes) must be at least 1"),
        ((5, 0, DIM), (3, DIM), None, "support: K (examples per class) must be"),
        ((5, 1, DIM), (3, DIM), "support", "support: contains NaN or Inf"),
        ((5, 1, DIM), (3, DIM), "query", "query: contains NaN or Inf"),
    ],
)
def test_bad_inputs_raise_errors_naming_the_problem(
    trained, support_shape, query_shape, corrupt, message
):
    _, export_dir = trained
    serving = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
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


def test_existing_export_dir_is_refused_without_overwrite(trained, tmp_path):
    config, _ = trained
    target = tmp_path / "exported"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "leo_tf.export",
        f"--checkpoint_path={config.train.checkpoint_path}",
        f"--export_dir={target}",
    ]
    refused = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300
    )
    assert refused.returncode != 0
    assert f"--export_dir={target}: exists and is not empty" in refused.stderr
    assert [p.name for p in target.iterdir()] == ["keep.txt"]

    replaced = subprocess.run(
        command + ["--overwrite"], env=env, capture_output=True, text=True, timeout=300
    )
    assert replaced.returncode == 0, replaced.stderr
    assert (target / "saved_model.pb").exists()
    assert not (target / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no leftovers


def test_failed_export_leaves_nothing_half_written(trained, tmp_path, monkeypatch):
    config, _ = trained
    previous = tmp_path / "exported"
    export_lib.export(config.train.checkpoint_path, previous)
    before = sorted(p.relative_to(previous) for p in previous.rglob("*"))

    def failing_save(module, directory):
        (pathlib.Path(directory) / "saved_model.pb").write_text("partial")
        raise OSError("disk full")

    monkeypatch.setattr(export_lib, "_save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_lib.export(config.train.checkpoint_path, previous, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        export_lib.export(config.train.checkpoint_path, tmp_path / "fresh")

    assert sorted(p.relative_to(previous) for p in previous.rglob("*")) == before
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
