"""RunConfigs for short in-process runs on the toy data of data_fixtures, the
environment of runs in a child process, and snapshots of run directories."""

import hashlib
import os
import pathlib

from leo_tf import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def subprocess_env(**extra):
    """os.environ for a child Python that imports this checkout, quietly."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO), **extra}


def toy_run_config(data_path, directory, **train):
    """A fast 5-way 1-shot run on data_fixtures' 'toy' set (16-d)."""
    defaults = dict(
        checkpoint_path=str(directory),
        num_steps_limit=20,
        checkpoint_steps=10,
        summary_steps=10,
        num_metatest_episodes=200,
    )
    defaults.update(train)
    return config_lib.RunConfig(
        model=config_lib.ModelConfig(num_latents=8, dropout_rate=0.2),
        optimizer=config_lib.OptimizerConfig(outer_lr=1e-3),
        data=config_lib.DataConfig(
            data_path=str(data_path),
            dataset_name="toy",
            metatrain_batch_size=4,
            metavalid_batch_size=20,
            metatest_batch_size=50,
        ),
        train=config_lib.TrainConfig(**defaults),
    )


def snapshot(directory):
    """{relative path: (content hash or link target or "dir", mtime)} of
    everything under `directory`, to check that nothing there changed."""
    state = {}
    for path in sorted(pathlib.Path(directory).rglob("*")):
        stat = path.lstat()
        if path.is_file() and not path.is_symlink():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest = os.readlink(path) if path.is_symlink() else "dir"
        state[str(path.relative_to(directory))] = (digest, stat.st_mtime_ns)
    return state
