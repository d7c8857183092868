"""Helpers of the run tests: the toy run, commands in child processes, snapshots.

The toy run (5-way 1-shot on data_fixtures' 'toy' set) as a RunConfig for
in-process runs and as flags for the commands, leo_tf commands in a child
process with this checkout's environment, snapshots of run directories, and
read-only directories.
"""

import contextlib
import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

from leo_tf import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

# The toy run's settings, per config section; the flags have the fields' names.
TOY_MODEL = dict(num_latents=8, dropout_rate=0.2)
TOY_OPTIMIZER = dict(outer_lr=1e-3)
TOY_DATA = dict(
    dataset_name="toy",
    metatrain_batch_size=4,
    metavalid_batch_size=20,
    metatest_batch_size=50,
)
TOY_TRAIN = dict(
    num_steps_limit=20,
    checkpoint_steps=10,
    summary_steps=10,
    num_metatest_episodes=200,
)


def subprocess_env(**extra):
    """os.environ for a child Python that imports this checkout, quietly;
    `extra` variables added, or removed where their value is None."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    env.update(extra)
    return {name: value for name, value in env.items() if value is not None}


def module_command(module, *args):
    """The command line of `python -u -m module args...` with this Python."""
    return [sys.executable, "-u", "-m", module, *map(str, args)]


def run_module(module, *args, env=None, timeout=300, **kwargs):
    """Runs `python -m module args...` from the checkout in a child process;
    returns its CompletedProcess (text; stdout and stderr captured).

    env: extra environment variables on top of subprocess_env().
    """
    return run_command(module_command(module, *args), env, timeout, **kwargs)


def run_python(source, *args, env=None, timeout=300, **kwargs):
    """Runs `python -c source args...` like run_module."""
    command = [sys.executable, "-c", source, *map(str, args)]
    return run_command(command, env, timeout, **kwargs)


def run_command(command, env=None, timeout=300, cwd=REPO, **kwargs):
    """Runs `command` (a list) like run_module."""
    return subprocess.run(
        command,
        cwd=cwd,
        env=subprocess_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def start_module(module, *args, env=None, **kwargs):
    """Starts `python -u -m module args...` like run_module; returns the Popen
    (text; stdout and stderr piped unless given)."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(
        module_command(module, *args),
        cwd=REPO,
        env=subprocess_env(**(env or {})),
        text=True,
        **kwargs,
    )


def toy_run_flags(data_path, directory, **train):
    """toy_run_config as leo_tf.train flags, `train` overriding any setting."""
    values = {
        "data_path": data_path,
        "checkpoint_path": directory,
        **TOY_MODEL,
        **TOY_OPTIMIZER,
        **TOY_DATA,
        **TOY_TRAIN,
        **train,
    }
    return [f"--{name}={value}" for name, value in values.items()]


def toy_run_config(data_path, directory, **train):
    """A fast 5-way 1-shot run on data_fixtures' 'toy' set (16-d)."""
    return config_lib.RunConfig(
        model=config_lib.ModelConfig(**TOY_MODEL),
        optimizer=config_lib.OptimizerConfig(**TOY_OPTIMIZER),
        data=config_lib.DataConfig(data_path=str(data_path), **TOY_DATA),
        train=config_lib.TrainConfig(
            checkpoint_path=str(directory), **{**TOY_TRAIN, **train}
        ),
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


@contextlib.contextmanager
def read_only(directory):
    """Inside, the existing `directory` is one nobody can write in, root
    included (root ignores permission bits; an immutable directory stops it)."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(directory)]).returncode != 0:
            pytest.fail("cannot make a read-only directory as root (chattr)")
        try:
            yield directory
        finally:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
    else:
        directory.chmod(0o555)
        try:
            yield directory
        finally:
            directory.chmod(0o755)
