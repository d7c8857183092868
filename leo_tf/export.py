"""`python -m leo_tf.export`: a trained LEO as a SavedModel anyone can serve.

    python -m leo_tf.export --checkpoint_path=runs/quickstart --export_dir=exports/leo

The SavedModel's `serving_default` signature adapts to a new few-shot task
and classifies queries in one call:

    support: float32 [N, K, D]   class n's K examples in row n
    query:   float32 [M, D]
    -> logits, probabilities: float32 [M, N]

N, K and M are any sizes; D must be the trained embedding width, and a wrong
D is refused with an error naming the input and the expected D. Inside: a
rescaling and L2-normalisation of every row (the outputs do not depend on
the scale of the inputs, however extreme), the encoder, the relation
network, the latent means, the latent inner loop and the finetuning loop
with the learned learning rates; no dropout, no sampling.

The `sampled` signature expresses LEO's uncertainty about the task: it adapts
S times with the latent codes and classifier weights sampled from their
Gaussians, as in meta-training but without dropout, and summarises the S
answers (see leo_tf/uncertainty.py):

    support: float32 [N, K, D], query: float32 [M, D],
    num_samples: int32 S >= 1, seed: int64
    -> mean_probabilities, probability_stddev: float32 [M, N],
       predictive_entropy: float32 [M]

The same seed gives the same answer. A `metadata`
signature (no inputs) and the asset `leo_metadata.json` tell a consumer D,
the unroll lengths, the training flags and the checkpoint step. The
SavedModel loads with `tf.saved_model.load` in a process without leo_tf.

The checkpoint is best_checkpoint by default, or the latest intact one,
saying so, if it is missing or damaged (run_directory.RunDirectory).

An export never touches its sources: an --export_dir that is, contains or
lies inside the run directory (where the exported checkpoint must lie) or
the run's data is refused, and so is one that holds anything but a previous
SavedModel (which --overwrite replaces). The SavedModel is written to a
hidden staging directory beside --export_dir and renamed into place; the
staging and retired directories of killed exports are removed by the next.
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import tempfile

from absl import flags, logging

from leo_tf import cli
from leo_tf import config as config_lib
from leo_tf import error_text, file_kinds

METADATA_ASSET = "leo_metadata.json"
SAVED_MODEL_FILE = "saved_model.pb"
_LISTED_ENTRIES = 3
# What tf.saved_model.save writes at the top of a SavedModel directory.
_SAVED_MODEL_ENTRIES = frozenset(
    {SAVED_MODEL_FILE, "variables", "assets", "fingerprint.pb"}
)


class ExportError(ValueError):
    """The export cannot be made; the message names the flag or file."""


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """The flags of `leo_tf.export`, beside leo_tf.train's (whose
    --checkpoint_path names the run to export)."""

    export_dir: str = config_lib.option(
        None, "Directory to write the SavedModel to.", path=True
    )
    checkpoint: str = config_lib.option(
        "best",
        "Which checkpoint: best (best_checkpoint/), latest, or a checkpoint "
        "prefix such as runs/x/ckpt-5000.",
        path=True,
    )
    overwrite: bool = config_lib.option(
        False, "Replace a previous SavedModel in --export_dir."
    )


def restore_model(directory, model_config, embedding_dim, which):
    """LEO restored from checkpoint `which`: (model, prefix, step).

    Args:
      directory: the run's RunDirectory.
      model_config: the ModelConfig of its config.json.
      embedding_dim: its D.
      which: "best" (best_checkpoint, else the latest intact checkpoint,
        saying so), "latest" (the latest intact checkpoint) or a checkpoint
        prefix.

    The prefix returned has its directory's symlinks resolved: the best
    checkpoint's is `.best/step-N/ckpt-N`.
    """
    from leo_tf import run_directory  # pylint: disable=g-import-not-at-top

    leo = run_directory.build_leo(model_config, embedding_dim)
    if which in ("best", "latest"):
        prefix, _, step = directory.restore_for_reading(leo, which, "export")
        return leo.model, _with_real_directory(prefix), step
    prefix = _with_real_directory(which)
    return leo.model, prefix, _restore_prefix(leo, which, prefix)


def _with_real_directory(prefix):
    """A checkpoint prefix in its directory with every symlink resolved."""
    prefix = pathlib.Path(prefix)
    return str(prefix.parent.resolve() / prefix.name)


def check_checkpoint_prefix(which, checkpoint_path):
    """ExportError unless --checkpoint=which (best, latest or a prefix) names
    a checkpoint that exists: a prefix needs its .index file (on any file
    system TensorFlow reads) and must lie in the run directory (the metadata
    records that run's configuration)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if which in ("best", "latest"):
        return
    if not tf.io.gfile.exists(f"{which}.index"):
        raise ExportError(
            f"--checkpoint={which}: no such checkpoint ({which}.index); a prefix "
            f"is a path, e.g. {pathlib.Path(checkpoint_path) / 'ckpt-1000'}"
        )
    run = pathlib.Path(checkpoint_path).resolve()  # a local directory
    remote = "://" in which
    home = which.rsplit("/", 1)[0] if remote else pathlib.Path(which).parent.resolve()
    if remote or (home != run and run not in home.parents):
        raise ExportError(
            f"--checkpoint={which}: not a checkpoint of --checkpoint_path="
            f"{checkpoint_path} ({home} is outside it), whose config.json the "
            "SavedModel would record as its training configuration; pass the "
            "directory of the run that wrote it as --checkpoint_path"
        )


def _restore_prefix(leo, which, prefix):
    """Restores `leo` from --checkpoint=which, a prefix; the step.

    The checkpoint (local and in the run directory: check_checkpoint_prefix)
    is read back whole first (checkpoints.verify_checkpoint), as best and
    latest are: a damaged one is refused naming its file, before a partial
    restore.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from leo_tf import checkpoints  # pylint: disable=g-import-not-at-top

    try:
        checkpoints.verify_checkpoint(prefix)
    except checkpoints.CheckpointError as error:
        raise ExportError(f"--checkpoint={which}: {error}") from error
    try:
        return leo.restore(prefix)
    except tf.errors.NotFoundError as error:
        raise ExportError(
            f"--checkpoint={which}: files of {prefix} are missing"
        ) from error
    except (tf.errors.OpError, IndexError, ValueError) as error:
        # A truncated data file raises IndexError ("Read less bytes ...").
        raise ExportError(
            f"--checkpoint={which}: cannot read {prefix}: {error_text.summary(error)}"
        ) from error


def _source_paths(checkpoint_path, config):
    """(description, path) of each source an export must leave untouched
    (the checkpoint exported lies in the run directory, or is remote)."""
    sources = [(f"the checkpoint path {checkpoint_path}", checkpoint_path)]
    data_path = config["data"].get("data_path")
    if isinstance(data_path, str) and data_path:
        sources.append(
            (
                f"the run's data path {data_path} (data.data_path in "
                f"{checkpoint_path / 'config.json'})",
                pathlib.Path(data_path),
            )
        )
    return sources


def _resolved(path):
    """`path` absolute, with every symbolic link in it resolved."""
    return pathlib.Path(os.path.realpath(path))


def check_sources(export_dir, sources):
    """Raises ExportError if `export_dir` is, contains or is inside a source.

    Args:
      export_dir: the --export_dir flag's value (a Path).
      sources: (description, directory) pairs.
    """
    target = _resolved(export_dir)
    for description, path in sources:
        source = _resolved(path)
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "lies inside"
        else:
            continue
        raise ExportError(
            f"--export_dir={export_dir}: {relation} {description}; an export "
            "must not touch its sources, choose a directory outside it"
        )


def check_writable(export_dir):
    """Raises ExportError unless `export_dir` is or can be made a directory."""
    target = _resolved(export_dir)
    if target.exists() and not target.is_dir():
        raise ExportError(
            f"--export_dir={export_dir}: is {file_kinds.describe(target)}, not a directory"
        )
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(
            f"--export_dir={export_dir}: cannot be created, {parent} is "
            f"{file_kinds.describe(parent)}, not a directory"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(
            f"--export_dir={export_dir}: cannot be written, {parent} is not " "writable"
        )


def check_replaceable(export_dir, overwrite):
    """Raises ExportError unless `export_dir` is new, empty, or a SavedModel
    that --overwrite allows to replace."""
    target = _resolved(export_dir)
    if not target.exists():
        return
    try:
        entries = sorted(target.iterdir())
    except OSError as error:
        raise ExportError(
            f"--export_dir={export_dir}: cannot be read ({error_text.summary(error)})"
        ) from error
    if not entries:
        return
    if (target / SAVED_MODEL_FILE).is_file():
        foreign = [entry for entry in entries if entry.name not in _SAVED_MODEL_ENTRIES]
        if foreign:
            raise ExportError(
                f"--export_dir={export_dir}: holds a SavedModel and also "
                f"{_listed(foreign)}; --overwrite replaces only a previous "
                "SavedModel"
            )
        if overwrite:
            return
        raise ExportError(
            f"--export_dir={export_dir}: holds a previous SavedModel "
            "(pass --overwrite to replace it)"
        )
    raise ExportError(
        f"--export_dir={export_dir}: not empty and not a SavedModel (holds "
        f"{_listed(entries)}); --overwrite replaces only a previous SavedModel"
    )


def _listed(entries):
    """'a.txt, sub/, c.txt and 2 more': the first few of `entries` (Paths)."""
    listed = ", ".join(
        entry.name + ("/" if entry.is_dir() else "")
        for entry in entries[:_LISTED_ENTRIES]
    )
    if len(entries) > _LISTED_ENTRIES:
        listed += f" and {len(entries) - _LISTED_ENTRIES} more"
    return listed


def remove_leftovers(export_dir):
    """Removes what killed exports left beside `export_dir`.

    Their staging directories `.NAME.tmp-PID-XXXXXXXX` and retired previous
    exports `.NAME.old-PID` carry the writer's pid; those of a live process,
    such as a concurrent export, are left alone. A retired SavedModel is
    moved back instead if `export_dir` is missing (its exporter was killed
    between its two renames).
    """
    target = _resolved(export_dir)
    if not target.parent.is_dir():
        return
    name = re.escape(target.name)
    # Staging names without a pid were made by earlier versions.
    staging = re.compile(rf"\.{name}\.tmp-(?:(\d+)-)?[a-z0-9_]{{8}}")
    retired = re.compile(rf"\.{name}\.old-(\d+)")
    for path in sorted(target.parent.iterdir()):
        if _left_by_dead_writer(path.name, staging):
            _remove(path)
        elif _left_by_dead_writer(path.name, retired):
            if os.path.lexists(target) or not (path / SAVED_MODEL_FILE).is_file():
                _remove(path)
                continue
            try:
                os.replace(path, target)
            except OSError as error:
                logging.warning("Cannot restore %s: %s", target, error)
            else:
                logging.warning("Restored %s from %s", target, path.name)


def _left_by_dead_writer(name, pattern):
    """Whether `name` matches `pattern` and its pid (group 1, if any) is not
    a process running here."""
    match = pattern.fullmatch(name)
    if match is None:
        return False
    from leo_tf import checkpoints  # pylint: disable=g-import-not-at-top

    return match.group(1) is None or not checkpoints.process_alive(int(match.group(1)))


def _remove(path):
    """Deletes the file or directory tree `path`, as far as it can."""
    logging.info("Removing %s, left by a killed export", path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def build_serving_module(model, metadata, asset_path):
    """A tf.Module with the serving, sampled and metadata signatures for `model`.

    `metadata` is also written to `asset_path`, saved as an asset.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from leo_tf import uncertainty  # pylint: disable=g-import-not-at-top

    dim = model.embedding_dim
    asset_path.write_text(json.dumps(metadata, indent=2, sort_keys=True))

    class LEOServing(tf.Module):
        """LEO adaptation + classification for one few-shot task per call."""

        def __init__(self):
            super().__init__(name="leo_serving")
            # The model's tf.Variables (under its Keras 3 variables) are what
            # the module tracks, not the Keras model: a SavedModel of Keras 3
            # variables loads with tf.saved_model.load, but the TF1 loader
            # (saved_model_cli run, TensorFlow Serving) leaves them
            # unrestored. The functions below use `model` from this scope.
            self.model_variables = [v.value for v in model.weights]
            self.metadata_asset = tf.saved_model.Asset(str(asset_path))

        # D is dynamic in the signature so that a wrong D reaches the check
        # naming it: a signature's caller is not held to the signature's shapes.
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None, None], tf.float32, name="support"),
                tf.TensorSpec([None, None], tf.float32, name="query"),
            ]
        )
        def serve(self, support, query):
            """support [N, K, D], query [M, D] -> logits, probabilities [M, N]."""
            support, query = _prepared_task(support, query, dim)
            shape = tf.shape(support)
            labels = tf.broadcast_to(
                tf.range(shape[0])[:, None, None], [shape[0], shape[1], 1]
            )
            adaptation = model.adapt(support[None], labels[None])
            class_weights = adaptation.class_weights  # [1, N, D]
            logits = model.predict(query[None, None], class_weights)[0, 0]
            return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None, None], tf.float32, name="support"),
                tf.TensorSpec([None, None], tf.float32, name="query"),
                tf.TensorSpec([], tf.int32, name="num_samples"),
                tf.TensorSpec([], tf.int64, name="seed"),
            ]
        )
        def serve_sampled(self, support, query, num_samples, seed):
            """S stochastic adaptations, summarised (see leo_tf.uncertainty).

            support [N, K, D], query [M, D], num_samples S, seed ->
            mean_probabilities, probability_stddev [M, N],
            predictive_entropy [M]; a pure function of the inputs.
            """
            check = tf.debugging.assert_positive(
                num_samples, message="num_samples: must be at least 1"
            )
            with tf.control_dependencies([check]):
                support, query = _prepared_task(support, query, dim)
            latent_noise, weight_noise = uncertainty.draw_adaptation_noise(
                model, tf.shape(support), num_samples, seed
            )
            return uncertainty.summarise(
                uncertainty.sampled_probabilities(
                    model, support, query, latent_noise, weight_noise
                )
            )

        @tf.function(input_signature=[])
        def metadata(self):
            """What a consumer needs to know, as constants."""
            return {
                "embedding_dim": tf.constant(dim, tf.int32),
                "inner_unroll_length": tf.constant(
                    metadata["inner_unroll_length"], tf.int32
                ),
                "finetuning_unroll_length": tf.constant(
                    metadata["finetuning_unroll_length"], tf.int32
                ),
                "checkpoint_step": tf.constant(metadata["checkpoint_step"], tf.int64),
                "training_config_json": tf.constant(
                    json.dumps(metadata["training_config"], sort_keys=True)
                ),
            }

    return LEOServing()


def _prepared_task(support, query, dim):
    """Checked and L2-normalised support [N, K, D] and query [M, D].

    Fails naming the input for a wrong D, no classes or examples, or a NaN
    or Inf; rows are normalised whatever their scale.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    shape = tf.shape(support)
    checks = [
        _assert_width(support, dim, "support"),
        _assert_width(query, dim, "query"),
        tf.debugging.assert_positive(
            shape[0], message="support: N (classes) must be at least 1"
        ),
        tf.debugging.assert_positive(
            shape[1], message="support: K (examples per class) must be at least 1"
        ),
        tf.debugging.assert_all_finite(support, message="support: contains NaN or Inf"),
        tf.debugging.assert_all_finite(query, message="query: contains NaN or Inf"),
    ]
    with tf.control_dependencies(checks):
        support = tf.ensure_shape(support, [None, None, dim])
        query = tf.ensure_shape(query, [None, dim])
    support = tf.math.l2_normalize(scaled_by_power_of_two(support), axis=-1)
    query = tf.math.l2_normalize(scaled_by_power_of_two(query), axis=-1)
    return support, query


def _assert_width(embeddings, dim, name):
    """An op failing with 'NAME: expected embeddings of D=dim, got d' unless
    the last axis of `embeddings` [..., d] has `dim` entries."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    width = tf.shape(embeddings)[-1]
    return tf.debugging.Assert(
        tf.equal(width, dim),
        [tf.strings.format(f"{name}: expected embeddings of D={dim}, got {{}}", width)],
    )


def scaled_by_power_of_two(x):
    """Each row of `x` [..., D] float32 times a power of two, exactly.

    The row's largest |entry| becomes at most 2^24 (at least 2^23 unless all
    are subnormal); a zero row stays zero; entries under 2^-126 of the row's
    largest become zero. Done on the bits: float arithmetic overflows for
    rows near the float32 maximum and TensorFlow's CPU kernels flush
    subnormal inputs (|x| < 1.2e-38) to zero. Finite inputs only.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    bits = tf.bitcast(x, tf.int32)
    biased_exponent = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 23), 0xFF)
    fraction = tf.bitwise.bitwise_and(bits, 0x7FFFFF)
    # |x| = significand * 2^(exponent - 150); subnormals have biased exponent 0.
    significand = tf.where(
        biased_exponent > 0, tf.bitwise.bitwise_or(fraction, 0x800000), fraction
    )
    exponent = tf.maximum(biased_exponent, 1)
    shift = exponent - tf.reduce_max(exponent, axis=-1, keepdims=True)  # <= 0
    power = tf.where(
        shift >= -126,
        tf.bitcast(tf.bitwise.left_shift(shift + 127, 23), tf.float32),
        0.0,
    )  # 2^shift
    magnitude = tf.cast(significand, tf.float32) * power
    return tf.where(bits < 0, -magnitude, magnitude)


def _save(module, directory):
    """Writes `module` as a SavedModel with its three signatures."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.saved_model.save(
        module,
        str(directory),
        signatures={
            "serving_default": module.serve.get_concrete_function(),
            "sampled": module.serve_sampled.get_concrete_function(),
            "metadata": module.metadata.get_concrete_function(),
        },
    )


def write_saved_model(model, metadata, export_dir):
    """Writes the SavedModel to `export_dir` via a staging directory beside it.

    If a write fails (disk full, read-only) raises ExportError, leaving no
    staging directory and a previous export as it was.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    target = _resolved(export_dir)
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(
            tempfile.mkdtemp(
                prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent
            )
        )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private
        with tempfile.TemporaryDirectory() as scratch:
            module = build_serving_module(
                model, metadata, pathlib.Path(scratch) / METADATA_ASSET
            )
            _save(module, staging)
        _move_into_place(staging, target)
    except (OSError, tf.errors.OpError) as error:
        raise ExportError(
            f"--export_dir={export_dir}: cannot write the SavedModel: "
            f"{error_text.summary(error)}"
        ) from error
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging, target):
    """Renames `staging` to `target`, replacing a previous export there."""
    if not target.exists():
        os.replace(staging, target)
        return
    retired = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired)


def check_checkpoint_path(checkpoint_path):
    """`checkpoint_path` as a Path; ExportError unless it is a directory."""
    checkpoint_path = pathlib.Path(checkpoint_path)
    if not checkpoint_path.is_dir():
        raise ExportError(f"--checkpoint_path={checkpoint_path}: not a directory")
    return checkpoint_path


def export(checkpoint_path, export_dir, which="best", overwrite=False):
    """Writes the SavedModel; returns the export directory (a Path).

    Every refusal (a source in the way, a non-directory, a directory holding
    something other than a previous SavedModel) comes before anything is
    written, except the removal of leftovers of killed exports.
    """
    from leo_tf import checkpoints  # pylint: disable=g-import-not-at-top
    from leo_tf import run_directory  # pylint: disable=g-import-not-at-top

    checkpoint_path = check_checkpoint_path(checkpoint_path)
    export_dir = pathlib.Path(export_dir)
    directory = run_directory.RunDirectory(checkpoint_path)
    config = directory.read_config()  # validated
    if config is None:
        raise ExportError(
            f"--checkpoint_path={checkpoint_path}: no {checkpoints.CONFIG_FILE} "
            "(not a leo_tf training directory)"
        )
    check_checkpoint_prefix(which, checkpoint_path)
    check_sources(export_dir, _source_paths(checkpoint_path, config))
    check_writable(export_dir)
    remove_leftovers(export_dir)
    check_replaceable(export_dir, overwrite)

    model, prefix, step = restore_model(
        directory,
        run_directory.model_config_of(config),
        config["embedding_dim"],
        which,
    )
    metadata = {
        "embedding_dim": config["embedding_dim"],
        "inner_unroll_length": config["model"]["inner_unroll_length"],
        "finetuning_unroll_length": config["model"]["finetuning_unroll_length"],
        "num_latents": config["model"]["num_latents"],
        "checkpoint": prefix,
        "checkpoint_step": step,
        "training_config": config,
        "inputs": {"support": "float32 [N, K, D]", "query": "float32 [M, D]"},
        "outputs": {"logits": "float32 [M, N]", "probabilities": "float32 [M, N]"},
    }
    write_saved_model(model, metadata, export_dir)
    logging.info("Exported %s (step %d) to %s", prefix, step, export_dir)
    return export_dir


def main(argv):
    if len(argv) > 1:
        raise cli.Failure(f"unexpected arguments: {' '.join(argv[1:])}")
    options = config_lib.values_of(ExportOptions)
    if not options.export_dir:
        raise cli.Failure("--export_dir is required")
    checkpoint_path = config_lib.values_of(config_lib.TrainConfig).checkpoint_path
    with cli.reported(config_lib.ConfigError, ExportError):
        config_lib.check(options)
        check_checkpoint_path(checkpoint_path)
    # Imported here so that flag errors are reported before TensorFlow loads.
    from leo_tf import checkpoints  # pylint: disable=g-import-not-at-top

    with cli.reported(ExportError, checkpoints.CheckpointError):
        path = export(
            checkpoint_path,
            options.export_dir,
            options.checkpoint,
            options.overwrite,
        )
    print(f"SavedModel written to {path}")


def run(argv=None):
    """Console entry point `leo-export`."""
    config_lib.define_flags()
    config_lib.define_flags_of([ExportOptions])
    flags.declare_key_flag("checkpoint_path")
    cli.run("leo_tf.export", main, argv)


if __name__ == "__main__":
    run()
