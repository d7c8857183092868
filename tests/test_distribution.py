"""Data-parallel meta-training with tf.distribute on this CPU-only machine."""

import dataclasses
import json
import os
import re
import socket
import textwrap
import types

import pytest

from leo_tf import config as config_lib
from leo_tf import distribute, trainer
from tests import run_fixtures

# Runs in a fresh process: logical devices must be set before TensorFlow
# initialises.
_MIRRORED_VS_SINGLE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    from leo_tf import steps
    from leo_tf.config import OptimizerConfig
    from tests import model_fixtures as fx

    config = OptimizerConfig(outer_lr=1e-3)
    spec = fx.episodes_spec(4, 3, 2, 4, 8)
    batches = [fx.random_episodes(seed, batch=4) for seed in range(3)]
    weights, metrics = [], []
    for strategy in (None, tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])):
        with strategy.scope() if strategy else tf.name_scope("single"):
            model = fx.small_model(dtype="float32", seed=0)
            optimizer = steps.make_optimizer(config)
        step = steps.compile_train_step(model, optimizer, config, spec,
                                        strategy=strategy)
        history = []
        for index, episodes in enumerate(batches):
            noise = fx.noise_for(episodes, model.config, seed=(4, index))
            result = step(episodes, noise)
            history.append([float(result.loss), float(result.accuracy),
                            float(result.gradient_norm)])
        weights.append([v.numpy() for v in model.trainable_variables])
        metrics.append(history)
        replicas = strategy.num_replicas_in_sync if strategy else 1
    differences = [float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
                   for a, b in zip(*weights)]
    changes = [float(np.abs(a - b).max()) for a, b in
               zip(weights[0], [v.numpy() for v in fx.small_model(seed=0).trainable_variables])]
    print(json.dumps({"replicas": replicas, "differences": differences,
                      "changes": changes, "metrics": metrics}))
    """)


@pytest.mark.slow
def test_mirrored_step_equals_single_device_step():
    process = run_fixtures.run_python(_MIRRORED_VS_SINGLE)
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert max(result["differences"]) < 1e-5, result["differences"]
    assert min(result["changes"]) > 1e-4  # three Adam steps moved every tensor
    single, mirrored = result["metrics"]
    for a, b in zip(single, mirrored):
        assert a == pytest.approx(b, rel=1e-5)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run_two_workers(tmp_path, data_path, directory, num_steps):
    """Runs a 2-worker multi_worker cluster on localhost to num_steps.

    Returns [(stdout, stderr)] of the chief and the other worker.
    """
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    workers = []
    for index in range(2):
        temporary = tmp_path / f"tmp{index}"
        os.makedirs(temporary, exist_ok=True)
        env = {
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
            "TMPDIR": str(temporary),
        }
        flags = run_fixtures.toy_run_flags(
            data_path,
            directory,
            distribution="multi_worker",
            num_steps_limit=num_steps,
            checkpoint_steps=3,
            summary_steps=3,
        )
        workers.append(run_fixtures.start_module("leo_tf.train", *flags, env=env))
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=300))
    finally:
        for worker in workers:
            worker.kill()
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    return outputs, workers[0].pid


def _digests(outputs, step):
    return [
        re.findall(rf"Step {step}: weights digest (\w+)", stderr)
        for _, stderr in outputs
    ]


@pytest.mark.slow
def test_two_worker_run_agrees_on_weights_and_only_the_chief_writes(toy_data, tmp_path):
    data_path = toy_data
    directory = tmp_path / "run"
    outputs, chief_pid = _run_two_workers(tmp_path, data_path, directory, 6)
    digests = _digests(outputs, 6)
    assert digests[0] and digests[0] == digests[1]
    assert "step 6/6" in outputs[0][0] and "step 6/6" not in outputs[1][0]
    # Only the chief writes: one event file, and the worker's own temporary
    # checkpoints are gone.
    events = list(directory.glob("events.out.tfevents.*"))
    assert len(events) == 1 and str(chief_pid) in events[0].name
    assert sorted(p.name for p in directory.glob("ckpt-*.index")) == [
        "ckpt-3.index",
        "ckpt-6.index",
    ]
    assert (directory / "best_checkpoint" / "metrics.json").exists()
    assert list((tmp_path / "tmp1").iterdir()) == []

    # Restarting the cluster (as after a worker failure): every worker
    # restores the chief's latest checkpoint and they continue in step.
    outputs, _ = _run_two_workers(tmp_path, data_path, directory, 9)
    for _, stderr in outputs:
        assert f"Resuming from {directory / 'ckpt-6'} at step 6" in stderr
    digests = _digests(outputs, 9)
    assert digests[0] and digests[0] == digests[1]
    assert sorted(p.name for p in directory.glob("ckpt-*.index")) == [
        "ckpt-3.index",
        "ckpt-6.index",
        "ckpt-9.index",
    ]
    assert list((tmp_path / "tmp1").iterdir()) == []


def test_meta_batch_must_split_evenly_over_replicas(toy_data, tmp_path):
    config = run_fixtures.toy_run_config(toy_data, tmp_path / "run")
    config = dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, metatrain_batch_size=5),
        train=dataclasses.replace(config.train, distribution="mirrored"),
    )
    strategy = types.SimpleNamespace(num_replicas_in_sync=2)
    with pytest.raises(
        config_lib.ConfigError,
        match=r"--metatrain_batch_size=5: must be a multiple "
        r"of the 2 replicas of --distribution=mirrored",
    ):
        trainer.train(config, strategy)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, problem",
    [
        ("not json", "is not JSON (Expecting value"),
        ("[1, 2]", "is not a JSON object"),
        ('{"task": {"type": "worker", "index": 0}}', 'has no "cluster" object'),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker"}}',
            'has no "task"',
        ),
    ],
)
def test_a_malformed_tf_config_is_refused_naming_it(text, problem):
    with pytest.raises(config_lib.ConfigError) as raised:
        distribute.check_tf_config(text)
    assert str(raised.value).startswith(
        f"--distribution=multi_worker: the TF_CONFIG environment variable {problem}"
    )


def test_an_unset_or_complete_tf_config_is_accepted():
    distribute.check_tf_config(None)
    distribute.check_tf_config(
        '{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 0}}'
    )


@pytest.mark.parametrize("towers, warned", [(2, True), (1, False), (0, False)])
def test_explicit_towers_under_a_strategy_are_said_to_split_evaluation_only(
    toy_data, tmp_path, caplog, towers, warned
):
    config = run_fixtures.toy_run_config(toy_data, tmp_path / "run")
    config = dataclasses.replace(
        config,
        train=dataclasses.replace(
            config.train, distribution="mirrored", num_towers=towers
        ),
    )
    with caplog.at_level("WARNING"):
        trainer.warn_towers_under_strategy(config, types.SimpleNamespace())
        trainer.warn_towers_under_strategy(config, None)
    expected = (
        f"--num_towers={towers}: under --distribution=mirrored each replica "
        "trains its share of the meta-batch as one tower"
    )
    assert [expected in record.getMessage() for record in caplog.records] == (
        [True] if warned else []
    )
