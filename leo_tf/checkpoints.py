"""Run-directory files: lock, atomic writes, records, checkpoint integrity, promotion.

The mechanics under run_directory.RunDirectory, which the commands use.

Layout under `checkpoint_path`:

    .lock                                   the trainer that owns the directory
    ckpt-<step>.index, ckpt-<step>.data-*   the latest checkpoints
    checkpoint                              TensorFlow's index of them
    config.json                             the run's configuration
    best_checkpoint -> .best/step-<step>    symlink to the best checkpoint
    .best/step-<step>/                      ckpt-<step>.*, checkpoint,
                                            metrics.json; the previous best
                                            is kept until the next promotion
    events.out.tfevents.*                   TensorBoard summaries
    test_results.json                       after --evaluation_mode or
                                            --evaluate_after_training

Ownership: one trainer writes a directory, holding an flock on `.lock`,
which records its pid, host, start time and command (RunLock). Evaluation
and export only read checkpoints, and evaluation writes test_results.json
atomically, so they need no lock and may run beside a trainer.

Atomicity: every file is written to a temporary name and renamed into place,
and the best checkpoint is promoted by building the new directory completely,
then atomically replacing the `best_checkpoint` symlink, so a run killed at
any moment leaves every file either as it was or complete. A failing write
(disk full, read-only) raises CheckpointError naming the path and removes
what it had half-written.

Integrity: a checkpoint is used only after every tensor of it reads back
(verify_checkpoint); JSON records are validated on read, naming the file and
field of any defect.
"""

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import sys
import time

import tensorflow as tf
from absl import logging

from leo_tf import config as config_lib
from leo_tf import error_text, file_kinds
from leo_tf.config import ConfigError

BEST_LINK = "best_checkpoint"
BEST_ROOT = ".best"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
RESULTS_FILE = "test_results.json"
LOCK_FILE = ".lock"
INDEX_FILE = "checkpoint"
CHECKPOINT_PREFIX = "ckpt"
_CHECKPOINT_FILE = re.compile(rf"{CHECKPOINT_PREFIX}-(\d+)\.(index|data-\d+-of-\d+)")

_SECTIONS = {
    "model": config_lib.ModelConfig,
    "optimizer": config_lib.OptimizerConfig,
    "data": config_lib.DataConfig,
    "train": config_lib.TrainConfig,
}

# (section, field) of config.json that a run is a pure function of: resuming
# with another value is refused. The flags not listed (num_steps_limit,
# checkpoint_steps, summary_steps, data_path, evaluation and hardware flags)
# may change from one invocation to the next.
FIXED_ON_RESUME = (
    *(("model", f.name) for f in dataclasses.fields(config_lib.ModelConfig)),
    *(("optimizer", f.name) for f in dataclasses.fields(config_lib.OptimizerConfig)),
    ("data", "dataset_name"),
    ("data", "embedding_crop"),
    ("data", "train_on_val"),
    ("data", "num_classes"),
    ("data", "num_tr_examples_per_class"),
    ("data", "num_val_examples_per_class"),
    ("data", "metatrain_batch_size"),
    ("data", "metavalid_batch_size"),
    ("train", "seed"),
    ("train", "fixed_metavalid_batches"),
)
# What the checkpoint's variables and the adaptation they were meta-learned
# for depend on: evaluating with another value is refused. The task (data
# set, N, K) may differ: LEO's weights do not depend on it.
FIXED_FOR_EVALUATION = (
    ("model", "num_latents"),
    ("model", "inner_unroll_length"),
    ("model", "finetuning_unroll_length"),
)

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


# --- Ownership ---------------------------------------------------------------


class RunLock:
    """Ownership of a run directory by one trainer: an flock on `.lock`.

    The file records the owner's pid, host, start time and command, so that
    another trainer is refused naming them. The kernel drops an flock when its
    process dies, however it dies, so a lock left by a dead process on this
    host is taken over, saying so; a record from another host is refused,
    since that process cannot be checked from here. As a context manager it
    releases the lock, if taken, on exit.
    """

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        self.path = self.directory / LOCK_FILE
        self._descriptor = None

    @property
    def held(self):
        return self._descriptor is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        """Takes the lock, or raises CheckpointError naming its holder.

        Writes nothing when refused.
        """
        descriptor = self._locked_descriptor()
        try:
            self._check_previous_holder(_read_lock_record(descriptor))
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": shlex.join(sys.argv),
            }
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, json.dumps(record).encode("utf-8"), 0)
            os.fsync(descriptor)
        except CheckpointError:
            os.close(descriptor)
            raise
        except OSError as error:
            self._descriptor = descriptor
            self.release()
            raise CheckpointError(f"could not write {self.path}: {error}") from error
        self._descriptor = descriptor

    def release(self):
        """Removes the lock file and drops the lock, if held."""
        if self._descriptor is None:
            return
        # A file left behind (read-only now) is taken over by the next run.
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        os.close(self._descriptor)
        self._descriptor = None

    def _locked_descriptor(self):
        """A descriptor of the lock file, holding its flock."""
        while True:
            try:
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise CheckpointError(f"could not open {self.path}: {error}") from error
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_lock_record(descriptor)
                os.close(descriptor)
                raise CheckpointError(self._in_use(holder)) from None
            except OSError as error:
                os.close(descriptor)
                raise CheckpointError(f"could not lock {self.path}: {error}") from error
            if _same_file(descriptor, self.path):
                return descriptor
            # Its owner removed it meanwhile; lock the file now at the path.
            os.close(descriptor)

    def _check_previous_holder(self, holder):
        """Refuses a live or unverifiable previous holder; logs a takeover."""
        if holder is None:
            return
        if holder.get("host") not in (None, socket.gethostname()):
            raise CheckpointError(
                f"{self._in_use(holder)}; if that trainer is no longer running, "
                f"delete {self.path}"
            )
        pid = holder.get("pid")
        if pid != os.getpid() and process_alive(pid):
            # Alive without its flock: a file system without working locks.
            raise CheckpointError(
                f"{self._in_use(holder)}; if pid {pid} is not that trainer, "
                f"delete {self.path}"
            )
        logging.warning(
            "%s: taking over the lock (%s), whose holder is no longer running",
            self.path,
            _describe_holder(holder),
        )

    def _in_use(self, holder):
        return (
            f"--checkpoint_path={self.directory}: in use by another trainer "
            f"({_describe_holder(holder)}); wait for it to end or stop it, or "
            "use another --checkpoint_path"
        )


def _read_lock_record(descriptor):
    """The lock file's record: None if empty, {} if unreadable."""
    content = os.pread(descriptor, 1 << 16, 0)
    if not content.strip():
        return None
    try:
        record = json.loads(content)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _describe_holder(holder):
    if not holder:
        return "its record is not written yet or unreadable"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')}, started "
        f"{holder.get('started')}: {holder.get('command')}"
    )


def _same_file(descriptor, path):
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def process_alive(pid):
    """Whether process `pid` (an int from a record) runs on this machine."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


# --- Files and JSON records --------------------------------------------------


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


def save_checkpoint(manager, step, also_intact=""):
    """`manager.save(checkpoint_number=step)`: the prefix written.

    A write that fails (disk full, read-only) raises CheckpointError naming
    the directory and the checkpoints that are intact (with `also_intact`,
    e.g. " and best_checkpoint"), after removing the `ckpt-<step>_temp`
    TensorFlow was writing into.
    """
    try:
        return manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as error:
        remove_stale_temporaries(manager.directory)
        raise CheckpointError(
            f"could not write the checkpoint of step {step} to "
            f"{manager.directory}: {error_text.summary(error)}. "
            + what_is_kept(manager.latest_checkpoint, also_intact)
        ) from error


def what_is_kept(latest, also_intact=""):
    """The sentence of a failed write's error that says what a rerun resumes
    from: the checkpoints up to `latest` (with `also_intact`, e.g. " and
    best_checkpoint"), or nothing yet when `latest` is None."""
    if latest is None:
        return "No checkpoint was written yet; rerun to start again."
    return (
        f"The checkpoints ({latest}){also_intact} are intact; rerun to resume "
        "from them."
    )


def check_usable(directory, for_writing, writes=None):
    """Raises CheckpointError if `directory` cannot be used, touching nothing.

    For writing, the directory (or its nearest existing parent, where it will
    be created) must be a writable directory; for reading, it must exist.
    `writes`, what the command would write there (e.g. "the meta-test writes
    test_results.json"), is added to a refusal for writing.
    """
    directory = pathlib.Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise CheckpointError(f"--checkpoint_path={directory}: not a directory")
        if not os.access(directory, os.R_OK | os.X_OK):
            raise CheckpointError(f"--checkpoint_path={directory}: not readable")
        if for_writing and not os.access(directory, os.W_OK):
            why = f" ({writes} there)" if writes else ""
            raise CheckpointError(f"--checkpoint_path={directory}: not writable{why}")
        return
    if directory.is_symlink():
        raise CheckpointError(
            f"--checkpoint_path={directory}: a broken symbolic link to "
            f"{os.readlink(directory)!r}"
        )
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


def write_json_atomically(path, payload):
    """Writes `payload` as JSON to `path` via a temporary file and a rename.

    Raises CheckpointError naming `path` if it cannot be written; `path` is
    then as it was and no temporary file is left.
    """
    write_file_atomically(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_file_atomically(path, content):
    """write_text_atomically (`content` str or bytes), a failure raised as a
    CheckpointError naming `path`; `path` is then as it was."""
    try:
        write_text_atomically(path, content)
    except OSError as error:
        raise CheckpointError(f"could not write {path}: {error}") from error


def write_text_atomically(path, text):
    """Writes `text` (str, UTF-8; or bytes) to `path` via a temporary file,
    fsync and a rename.

    On failure removes the temporary file and raises the OSError.
    """
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    content = text.encode("utf-8") if isinstance(text, str) else text
    try:
        with open(temporary, "wb") as stream:
            stream.write(content)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise


def read_json(path):
    """The JSON value in `path`, or None if there is no such file."""
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable ({error})") from error


_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


# Field type of a config dataclass -> (check, what is expected).
_FIELD_CHECKS = {
    int: (_is_int, "an integer"),
    float: (_is_number, "a finite number"),
    str: (lambda value: isinstance(value, str), "a string"),
    bool: (lambda value: isinstance(value, bool), "true or false"),
}


def _read_object(path):
    """The JSON object in `path`, None if absent; CheckpointError otherwise."""
    record = read_json(path)
    if record is not None and not isinstance(record, dict):
        raise CheckpointError(
            f"{path}: expected a JSON object, found {_JSON_TYPES[type(record)]}"
        )
    return record


def _require(record, path, key, check, expectation, label=None):
    """record[key] if check() accepts it; CheckpointError naming the field."""
    label = label or key
    if key not in record:
        raise CheckpointError(f"{path}: no {label} (expected {expectation})")
    value = record[key]
    if not check(value):
        raise CheckpointError(
            f"{path}: {label} is {json.dumps(value)}, expected {expectation}"
        )
    return value


def read_config(directory):
    """The run's config.json, validated, or None if there is none.

    Holds at least the FIXED_ON_RESUME fields, each of its flag's type, and
    a positive embedding_dim (D); CheckpointError names the file and field.
    """
    path = pathlib.Path(directory) / CONFIG_FILE
    record = _read_object(path)
    if record is None:
        return None
    if written_by(record) == "leo_tf.regression":
        raise CheckpointError(
            f"--checkpoint_path={directory}: a leo_tf.regression run directory "
            f"(its {CONFIG_FILE}), not a leo_tf.train one; use another "
            "--checkpoint_path"
        )
    for section, name in FIXED_ON_RESUME:
        values = _require(
            record, path, section, lambda v: isinstance(v, dict), "an object"
        )
        field_type = {f.name: f.type for f in dataclasses.fields(_SECTIONS[section])}
        check, expectation = _FIELD_CHECKS[field_type[name]]
        _require(values, path, name, check, expectation, label=f"{section}.{name}")
    _require(
        record,
        path,
        "embedding_dim",
        lambda v: _is_int(v) and v >= 1,
        "a positive integer",
    )
    return record


def written_by(record):
    """Which command wrote the config.json `record` (a dict): "leo_tf.train"
    (sections model, data, ... as objects), "leo_tf.regression" (its flat
    fields, num_shots among them), or None if neither shape."""
    if isinstance(record.get("model"), dict):
        return "leo_tf.train"
    if "num_shots" in record:
        return "leo_tf.regression"
    return None


def read_metrics(path):
    """A best checkpoint's metrics.json, validated (step, metavalid_accuracy)."""
    record = _read_object(path)
    if record is None:
        raise CheckpointError(f"{path}: missing")
    _require(record, path, "step", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _require(
        record,
        path,
        "metavalid_accuracy",
        lambda v: _is_number(v) and 0 <= v <= 1,
        "a number in [0, 1]",
    )
    return record


def _foreign_entries(directory):
    """Sorted names in `directory` that no run writes before its config.json.

    A run directory starts with its lock and temporaries (hidden names);
    TensorBoard events and flagfiles may come first too (a search writes a
    trial's flagfile and hyperparameters before training it).
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        entry.name
        for entry in directory.iterdir()
        if not entry.name.startswith((".", "events.out.tfevents."))
        and entry.suffix != ".cfg"
    )


def check_unconfigured(directory):
    """CheckpointError unless `directory`, which has no config.json, is new or
    holds only what a run writes before it: checkpoints there could not be
    checked against the flags, and other files are not a run's."""
    if checkpoint_prefixes(directory):
        raise CheckpointError(
            f"{pathlib.Path(directory) / CONFIG_FILE}: missing, but the "
            "directory holds checkpoints; restore the file or use another "
            "--checkpoint_path"
        )
    foreign = _foreign_entries(directory)
    if foreign:
        listed = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise CheckpointError(
            f"--checkpoint_path={directory}: not a leo_tf run directory "
            f"(no {CONFIG_FILE}) and not empty (holds {listed}); use a new "
            "or empty directory"
        )


def check_compatible(directory, config, embedding_dim, fixed):
    """ConfigError unless `config` agrees with the run's config.json on `fixed`.

    Args:
      directory: the run directory.
      config: the RunConfig of this invocation.
      embedding_dim: D of the data set it uses; must equal the run's.
      fixed: (section, field) pairs that must be equal, e.g. FIXED_ON_RESUME.

    A directory holding checkpoints but no config.json is refused too: its
    checkpoints cannot be checked against the flags.
    """
    saved = read_config(directory)
    if saved is None:
        check_unconfigured(directory)
        return
    if saved["embedding_dim"] != embedding_dim:
        raise ConfigError(
            f"--dataset_name={config.data.dataset_name}: its embeddings are "
            f"{embedding_dim}-d, but the checkpoints in {directory} were made "
            f"for {saved['embedding_dim']}-d embeddings "
            f"({saved['data']['dataset_name']}); use another --checkpoint_path"
        )
    check_unchanged(
        directory,
        {name: saved[section][name] for section, name in fixed},
        {name: getattr(getattr(config, section), name) for section, name in fixed},
    )


def check_unchanged(directory, saved, current):
    """ConfigError naming every flag whose value in `current` differs from
    the run's.

    Args:
      directory: the run directory.
      saved: {flag name: value} as the run's config.json holds them.
      current: {flag name: value} of this invocation.
    """
    changed = [
        (name, saved.get(name), value)
        for name, value in current.items()
        if saved.get(name) != value
    ]
    if changed:
        raise ConfigError(
            f"--checkpoint_path={directory}: this run was made with "
            + ", ".join(f"{name}={old}" for name, old, _ in changed)
            + f" (its {CONFIG_FILE}), not "
            + ", ".join(f"--{name}={new}" for name, _, new in changed)
            + "; pass the run's values, or use another --checkpoint_path"
        )


# --- Checkpoints and their integrity -----------------------------------------


def checkpoint_prefixes(directory):
    """The prefixes of the ckpt-<step> files in `directory`, newest first.

    Every step with an .index or a .data-* file is listed, whole or not.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    steps = {
        int(match.group(1))
        for match in map(_CHECKPOINT_FILE.fullmatch, os.listdir(directory))
        if match
    }
    return [
        str(directory / f"{CHECKPOINT_PREFIX}-{step}")
        for step in sorted(steps, reverse=True)
    ]


def verify_checkpoint(prefix):
    """Raises CheckpointError naming the damaged file unless the checkpoint
    at `prefix` reads back whole: its files are regular files, its .index
    parses and every tensor in its data files reads back with a matching
    checksum."""
    index = f"{prefix}.index"
    if not os.path.exists(index):
        raise CheckpointError(f"{index}: missing")
    check_regular_files(prefix)
    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except (tf.errors.OpError, ValueError) as error:
        raise CheckpointError(
            f"{index}: damaged ({error_text.summary(error)})"
        ) from error
    try:
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except (tf.errors.OpError, IndexError, ValueError) as error:
        data = sorted(
            pathlib.Path(prefix).parent.glob(f"{pathlib.Path(prefix).name}.data-*")
        )
        named = str(data[0]) if len(data) == 1 else f"{prefix}.data-*"
        raise CheckpointError(
            f"{named}: damaged ({error_text.summary(error)})"
        ) from error


def check_regular_files(prefix):
    """Raises CheckpointError naming the first file of the checkpoint at
    `prefix` that is not a regular file: TensorFlow can neither read it nor
    save the checkpoint over it."""
    prefix = pathlib.Path(prefix)
    for path in sorted(prefix.parent.glob(f"{prefix.name}.*")):
        if not path.is_file():
            raise CheckpointError(
                f"{path}: {file_kinds.describe(path)}, not a checkpoint file"
            )


def check_newer_replaceable(directory, prefix):
    """Raises CheckpointError before a run resumes from `prefix` (None: from
    step 0) if a newer checkpoint in `directory`, which the run's saves
    replace, has a file that a save cannot replace (a directory, say)."""
    newer = checkpoint_prefixes(directory)
    if prefix is not None:
        newer = newer[: newer.index(str(prefix))]
    for each in newer:
        try:
            check_regular_files(each)
        except CheckpointError as error:
            raise CheckpointError(
                f"{error}; resuming from {prefix or 'step 0'} would save "
                f"{pathlib.Path(each).name} over it: move it away, then rerun"
            ) from None


def indexed_checkpoint(directory):
    """The prefix TensorFlow's `checkpoint` index in `directory` names as the
    latest, or None if the index is missing, empty or unreadable."""
    try:
        return tf.train.latest_checkpoint(str(directory))
    except ValueError:  # an index without model_checkpoint_path, e.g. empty
        return None


# What a trainer that finds no intact checkpoint can do.
RESUME_REMEDY = "move the damaged ones away to start again from step 0"


def latest_intact_checkpoint(directory, remedy=RESUME_REMEDY):
    """The latest checkpoint in `directory` that reads back whole, or None.

    The latest is the one TensorFlow's `checkpoint` index names, else (no
    index) the highest step; damaged ones are skipped for the next older,
    with a warning naming each. If there are checkpoints but none is intact,
    CheckpointError names them all, then says `remedy` (by default, the
    advice to a trainer).
    """
    candidates = checkpoint_prefixes(directory)
    indexed = indexed_checkpoint(directory)
    if indexed in candidates:
        # Newer files than the index names are a save cut short.
        candidates = candidates[candidates.index(indexed) :]
    damaged = []
    for prefix in candidates:
        try:
            verify_checkpoint(prefix)
        except CheckpointError as error:
            logging.warning("Skipping checkpoint %s: %s", prefix, error)
            damaged.append(str(error))
            continue
        return prefix
    if damaged:
        raise CheckpointError(
            f"--checkpoint_path={directory}: no intact checkpoint ("
            + "; ".join(damaged)
            + f"); {remedy}"
        )
    return None


def index_checkpoint(directory, prefix):
    """Makes TensorFlow's `checkpoint` index name `prefix` as the latest.

    Rewrites a missing index, one naming another checkpoint (one newer but
    damaged), or one that leaves out older checkpoints on disk (which no
    save would then rotate out), from the files, saying so. Listed, in step
    order, are
    `prefix` and the older checkpoints, each with the time it was written
    and none preserved, so that the CheckpointManager rotates them out as
    usual (keeping its max_to_keep latest); an older checkpoint with a file
    that a save could not remove (a directory, say) is left out, named.
    """
    directory = pathlib.Path(directory)
    indexed = indexed_checkpoint(directory)
    index = directory / INDEX_FILE
    step = _step(prefix)
    older = [p for p in reversed(checkpoint_prefixes(directory)) if _step(p) < step]
    if indexed == prefix:
        unlisted = _unlisted(directory, older)
        if not unlisted:
            return
        indexed = f"{prefix} but not {', '.join(unlisted)}"
    listed = [*_removable(older, index), str(prefix)]
    names = [pathlib.Path(p).name for p in listed]
    try:
        write_text_atomically(index, _checkpoint_index(names, _written_at(listed)))
    except OSError as error:
        raise CheckpointError(f"could not write {index}: {error}") from error
    logging.warning(
        "%s: %s; rebuilt from the files, naming %s",
        index,
        f"named {indexed}" if indexed else "missing or unreadable",
        pathlib.Path(prefix).name,
    )


def _unlisted(directory, prefixes):
    """The names of the checkpoints of `prefixes` that the `checkpoint`
    index of `directory` does not list."""
    state = tf.train.get_checkpoint_state(str(directory))
    listed = {pathlib.Path(p).name for p in state.all_model_checkpoint_paths}
    return [
        pathlib.Path(p).name for p in prefixes if pathlib.Path(p).name not in listed
    ]


def _removable(prefixes, index):
    """The checkpoints of `prefixes` whose files a save's rotation can
    delete; a warning names each of the others, which `index` leaves out."""
    removable = []
    for prefix in prefixes:
        try:
            check_regular_files(prefix)
        except CheckpointError as error:
            logging.warning(
                "%s; %s left out of %s, so never rotated out: move it away",
                error,
                prefix,
                index,
            )
            continue
        removable.append(prefix)
    return removable


def _written_at(prefixes):
    """When each checkpoint was written, as the CheckpointManager records it:
    seconds since the Epoch, the latest modification time of its files, but
    not later than now (the manager would count a later one as now, which
    it treats as preserved, never to be deleted)."""
    now = time.time()
    times = []
    for prefix in prefixes:
        prefix = pathlib.Path(prefix)
        files = prefix.parent.glob(f"{prefix.name}.*")
        times.append(min(now, max(path.stat().st_mtime for path in files)))
    return times


def _step(prefix):
    return int(pathlib.Path(prefix).name.rsplit("-", 1)[1])


def _checkpoint_index(names, timestamps=None):
    """TensorFlow's `checkpoint` index text: names[-1] the latest.

    With `timestamps` (when each was written), the CheckpointManager manages
    every checkpoint named: it preserves only those written no later than
    last_preserved_timestamp, here a second before the earliest.
    """
    text = f'model_checkpoint_path: "{names[-1]}"\n' + "".join(
        f'all_model_checkpoint_paths: "{name}"\n' for name in names
    )
    if timestamps is None:
        return text
    return (
        text
        + "".join(f"all_model_checkpoint_timestamps: {t!r}\n" for t in timestamps)
        + f"last_preserved_timestamp: {min(timestamps) - 1.0!r}\n"
    )


# --- The best checkpoint -----------------------------------------------------


def _resolved_best(directory):
    """The real `.best/step-<step>` directory `best_checkpoint` names, or None."""
    best = pathlib.Path(os.path.realpath(pathlib.Path(directory) / BEST_LINK))
    return best if best.is_dir() else None


def best_checkpoint(directory):
    """(prefix, validated metrics.json) of the best checkpoint, or None.

    The `best_checkpoint` link is resolved once, so the prefix lies inside
    the real `.best/step-<step>` directory and both come from the same
    promotion: a reader holding them is unaffected by later promotions (the
    directory is kept until the promotion after the next one).
    """
    best = _resolved_best(directory)
    if best is None:
        return None
    prefix = indexed_checkpoint(best)
    if prefix is None:
        return None
    return prefix, read_metrics(best / METRICS_FILE)


def best_checkpoint_prefix(directory):
    """The best checkpoint's prefix, inside its real directory, or None."""
    best = _resolved_best(directory)
    return None if best is None else indexed_checkpoint(best)


def best_metrics(directory):
    """metrics.json of the best checkpoint, validated, or None."""
    best = best_checkpoint(directory)
    return None if best is None else best[1]


def promote_to_best(directory, checkpoint_prefix, metrics):
    """Makes `checkpoint_prefix` the best checkpoint, atomically.

    Args:
      directory: the run directory.
      checkpoint_prefix: e.g. `<directory>/ckpt-1000`, an existing checkpoint.
      metrics: JSON-able dict written as metrics.json; must hold "step".

    Keeps the previous best's directory, which a reader may still be reading,
    and removes older ones. Raises CheckpointError naming the path if a write
    fails (disk full, read-only), leaving no staging directory behind and
    `best_checkpoint` as it was (or, if only syncing failed, complete).
    """
    directory = pathlib.Path(directory)
    root = directory / BEST_ROOT
    target = root / f"step-{metrics['step']}"
    staging = root / f".staging-{metrics['step']}-{os.getpid()}"
    temporary_link = directory / f".{BEST_LINK}.tmp-{os.getpid()}"
    previous = _resolved_best(directory)
    try:
        _stage(root, staging, checkpoint_prefix, metrics)
        crash_point("promote:staged")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        crash_point("promote:moved")
        if temporary_link.is_symlink() or temporary_link.exists():
            temporary_link.unlink()
        os.symlink(os.path.relpath(target, directory), temporary_link)
        os.replace(temporary_link, directory / BEST_LINK)
        _fsync_directory(directory)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            temporary_link.unlink(missing_ok=True)
        if _resolved_best(directory) != target:
            shutil.rmtree(target, ignore_errors=True)
        raise CheckpointError(
            f"could not promote {checkpoint_prefix} to {directory / BEST_LINK}: "
            f"{error}. Nothing half-written is left; rerun to resume"
        ) from error
    crash_point("promote:linked")
    for stale in root.iterdir():
        if stale not in (target, previous):
            shutil.rmtree(stale, ignore_errors=True)


def _stage(root, staging, checkpoint_prefix, metrics):
    """Builds the complete best-checkpoint directory at `staging`."""
    root.mkdir(exist_ok=True)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    name = pathlib.Path(checkpoint_prefix).name
    for source in pathlib.Path(checkpoint_prefix).parent.glob(f"{name}.*"):
        shutil.copy2(source, staging / source.name)
    write_text_atomically(staging / INDEX_FILE, _checkpoint_index([name]))
    write_text_atomically(
        staging / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True) + "\n"
    )
    _fsync_directory(staging)


def _fsync_directory(directory):
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
