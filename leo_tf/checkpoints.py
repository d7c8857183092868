"""The files of a run directory: checkpoints, the best checkpoint, configs.

Layout under `checkpoint_path`:

    ckpt-<step>.index, ckpt-<step>.data-*   the latest checkpoints
    checkpoint                              TensorFlow's index of them
    config.json                             the run's configuration
    best_checkpoint -> .best/step-<step>    symlink to the best checkpoint
    .best/step-<step>/                      ckpt-<step>.*, checkpoint,
                                            metrics.json
    events.out.tfevents.*                   TensorBoard summaries
    test_results.json                       after --evaluation_mode

Every file is written to a temporary name and renamed into place, and the
best checkpoint is promoted by building the new directory completely, then
atomically replacing the `best_checkpoint` symlink, so a run killed at any
moment leaves every file either as it was or complete.
"""

import json
import os
import pathlib
import shutil
import signal

import tensorflow as tf

BEST_LINK = "best_checkpoint"
BEST_ROOT = ".best"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
RESULTS_FILE = "test_results.json"
CHECKPOINT_PREFIX = "ckpt"


# Test hook: the crash point named in this environment variable kills the
# process there (see crash_point).
CRASH_POINT_ENV = "LEO_TF_CRASH_AT"


class CheckpointError(RuntimeError):
    """The run directory cannot be used; the message says why and where."""


def crash_point(name):
    """Dies abruptly (SIGKILL) here if $LEO_TF_CRASH_AT is `name`.

    Lets the preemption tests kill a run at exact moments, such as between
    the steps of a best-checkpoint promotion, and check that nothing is lost.
    """
    if os.environ.get(CRASH_POINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def remove_stale_temporaries(directory):
    """Removes what a killed run may have left half-written in `directory`.

    Temporary JSON files and symlinks of ours, and the `ckpt-*_temp*`
    directories TensorFlow writes a checkpoint into before renaming it.
    None of them is ever read.
    """
    directory = pathlib.Path(directory)
    for path in directory.glob(".*.tmp-*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for path in directory.glob(f"{CHECKPOINT_PREFIX}-*_temp*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def write_json_atomically(path, payload):
    """Writes `payload` as JSON to `path` via a temporary file and a rename."""
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as stream:
        json.dump(payload, stream, indent=2, sort_keys=True)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def read_json(path):
    """The JSON object in `path`, or None if there is no such file."""
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable ({error})") from error


def check_usable(directory, for_writing):
    """Raises CheckpointError if `directory` cannot be used, touching nothing.

    For writing, the directory (or its nearest existing parent, where it will
    be created) must be a writable directory; for reading, it must exist.
    """
    directory = pathlib.Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise CheckpointError(f"--checkpoint_path={directory}: not a directory")
        if not os.access(directory, os.R_OK | os.X_OK):
            raise CheckpointError(f"--checkpoint_path={directory}: not readable")
        if for_writing and not os.access(directory, os.W_OK):
            raise CheckpointError(f"--checkpoint_path={directory}: not writable")
        return
    if not for_writing:
        raise CheckpointError(f"--checkpoint_path={directory}: does not exist")
    parent = directory.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"--checkpoint_path={directory}: cannot be created, {parent} is "
            "not a writable directory"
        )


def best_checkpoint_prefix(directory):
    """The checkpoint prefix in `directory`/best_checkpoint, or None."""
    best = pathlib.Path(directory) / BEST_LINK
    if not best.is_dir():
        return None
    return tf.train.latest_checkpoint(str(best))


def best_metrics(directory):
    """metrics.json of the best checkpoint, or None."""
    if best_checkpoint_prefix(directory) is None:
        return None
    return read_json(pathlib.Path(directory) / BEST_LINK / METRICS_FILE)


def promote_to_best(directory, checkpoint_prefix, metrics):
    """Makes `checkpoint_prefix` the best checkpoint, atomically.

    Args:
      directory: the run directory.
      checkpoint_prefix: e.g. `<directory>/ckpt-1000`, an existing checkpoint.
      metrics: JSON-able dict written as metrics.json; must hold "step".
    """
    directory = pathlib.Path(directory)
    root = directory / BEST_ROOT
    root.mkdir(exist_ok=True)
    name = pathlib.Path(checkpoint_prefix).name
    target = root / f"step-{metrics['step']}"
    staging = root / f".staging-{metrics['step']}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    for source in pathlib.Path(checkpoint_prefix).parent.glob(f"{name}.*"):
        shutil.copy2(source, staging / source.name)
    _write_checkpoint_index(staging, name)
    write_json_atomically(staging / METRICS_FILE, metrics)
    _fsync_directory(staging)
    crash_point("promote:staged")
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    crash_point("promote:moved")
    link = directory / BEST_LINK
    temporary_link = directory / f".{BEST_LINK}.tmp-{os.getpid()}"
    if temporary_link.is_symlink() or temporary_link.exists():
        temporary_link.unlink()
    os.symlink(os.path.relpath(target, directory), temporary_link)
    os.replace(temporary_link, link)
    _fsync_directory(directory)
    crash_point("promote:linked")
    for stale in root.iterdir():
        if stale != target:
            shutil.rmtree(stale, ignore_errors=True)


def _write_checkpoint_index(directory, name):
    """Writes TensorFlow's `checkpoint` index naming checkpoint `name`."""
    content = (
        f'model_checkpoint_path: "{name}"\n' f'all_model_checkpoint_paths: "{name}"\n'
    )
    with open(directory / "checkpoint", "w", encoding="utf-8") as stream:
        stream.write(content)
        stream.flush()
        os.fsync(stream.fileno())


def _fsync_directory(directory):
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
