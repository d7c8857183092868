"""`python -m leo_tf.export`: a trained LEO as a SavedModel anyone can serve.

    python -m leo_tf.export --checkpoint_path=runs/quickstart --export_dir=exports/leo

The SavedModel's `serving_default` signature adapts to a new few-shot task
and classifies queries in one call:

    support: float32 [N, K, D]   class n's K examples in row n
    query:   float32 [M, D]
    -> logits, probabilities: float32 [M, N]

N, K and M are dynamic; D is fixed. Inside: L2-normalisation, the encoder,
the relation network, the latent means, the latent inner loop and the
finetuning loop with the learned learning rates; no dropout, no sampling.
A `metadata` signature (no inputs) and the asset `leo_metadata.json` tell a
consumer D, the unroll lengths, the training flags and the checkpoint step.
The SavedModel loads with `tf.saved_model.load` in a process without leo_tf.
"""

import json
import os
import pathlib
import shutil
import tempfile

from absl import flags, logging

from leo_tf import cli
from leo_tf import config as config_lib

# --checkpoint_path is the training flag of leo_tf.config: the directory to
# export from.
flags.declare_key_flag("checkpoint_path")
flags.DEFINE_string("export_dir", None, "Directory to write the SavedModel to.")
flags.DEFINE_string(
    "checkpoint",
    "best",
    "Which checkpoint: best (best_checkpoint/), latest, or a checkpoint prefix "
    "such as runs/x/ckpt-5000.",
)
flags.DEFINE_boolean("overwrite", False, "Replace an existing non-empty --export_dir.")

METADATA_ASSET = "leo_metadata.json"


class ExportError(ValueError):
    """The export cannot be made; the message names the flag or file."""


def resolve_checkpoint(checkpoint_path, which):
    """The checkpoint prefix to export and a word for where it came from."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from leo_tf import checkpoints  # pylint: disable=g-import-not-at-top

    if which == "best":
        prefix = checkpoints.best_checkpoint_prefix(checkpoint_path)
        if prefix is None:
            raise ExportError(
                f"--checkpoint_path={checkpoint_path}: no best_checkpoint "
                "(pass --checkpoint=latest to export the latest checkpoint)"
            )
        return prefix
    if which == "latest":
        prefix = tf.train.latest_checkpoint(str(checkpoint_path))
        if prefix is None:
            raise ExportError(f"--checkpoint_path={checkpoint_path}: no checkpoint")
        return prefix
    if not tf.io.gfile.exists(f"{which}.index"):
        raise ExportError(f"--checkpoint={which}: no such checkpoint ({which}.index)")
    return which


def build_serving_module(model, metadata, asset_path):
    """A tf.Module with the serving and metadata signatures for `model`.

    `metadata` is also written to `asset_path`, saved as an asset.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    dim = model.embedding_dim
    asset_path.write_text(json.dumps(metadata, indent=2, sort_keys=True))

    class LEOServing(tf.Module):
        """LEO adaptation + classification for one few-shot task per call."""

        def __init__(self):
            super().__init__(name="leo_serving")
            self.model = model
            self.metadata_asset = tf.saved_model.Asset(str(asset_path))

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None, dim], tf.float32, name="support"),
                tf.TensorSpec([None, dim], tf.float32, name="query"),
            ]
        )
        def serve(self, support, query):
            """support [N, K, D], query [M, D] -> logits, probabilities [M, N]."""
            shape = tf.shape(support)
            checks = [
                tf.debugging.assert_positive(
                    shape[0], message="support: N (classes) must be at least 1"
                ),
                tf.debugging.assert_positive(
                    shape[1],
                    message="support: K (examples per class) must be at least 1",
                ),
                tf.debugging.assert_all_finite(
                    support, message="support: contains NaN or Inf"
                ),
                tf.debugging.assert_all_finite(
                    query, message="query: contains NaN or Inf"
                ),
            ]
            with tf.control_dependencies(checks):
                support = tf.math.l2_normalize(support, axis=-1)
                query = tf.math.l2_normalize(query, axis=-1)
            labels = tf.broadcast_to(
                tf.range(shape[0])[:, None, None], [shape[0], shape[1], 1]
            )
            adaptation = self.model.adapt(support[None], labels[None])
            class_weights = adaptation.class_weights  # [1, N, D]
            logits = self.model.predict(query[None, None], class_weights)[0, 0]
            return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

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


def _save(module, directory):
    """Writes `module` as a SavedModel with its two signatures."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.saved_model.save(
        module,
        str(directory),
        signatures={
            "serving_default": module.serve.get_concrete_function(),
            "metadata": module.metadata.get_concrete_function(),
        },
    )


def export(checkpoint_path, export_dir, which="best", overwrite=False):
    """Writes the SavedModel; returns the export directory (a Path).

    The SavedModel is written to a temporary sibling directory and renamed
    into place, so an interrupted export leaves nothing half-written.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from leo_tf import checkpoints  # pylint: disable=g-import-not-at-top
    from leo_tf.model import LEO  # pylint: disable=g-import-not-at-top

    checkpoint_path = pathlib.Path(checkpoint_path)
    export_dir = pathlib.Path(export_dir)
    if export_dir.exists() and (not export_dir.is_dir() or any(export_dir.iterdir())):
        if not overwrite:
            raise ExportError(
                f"--export_dir={export_dir}: exists and is not empty "
                "(pass --overwrite to replace it)"
            )
    if not checkpoint_path.is_dir():
        raise ExportError(f"--checkpoint_path={checkpoint_path}: not a directory")
    config = checkpoints.read_json(checkpoint_path / checkpoints.CONFIG_FILE)
    if config is None:
        raise ExportError(
            f"--checkpoint_path={checkpoint_path}: no {checkpoints.CONFIG_FILE} "
            "(not a leo_tf training directory)"
        )
    prefix = resolve_checkpoint(checkpoint_path, which)

    model = LEO(config_lib.ModelConfig(**config["model"]), config["embedding_dim"])
    step = tf.Variable(0, dtype=tf.int64, trainable=False)
    tf.train.Checkpoint(model=model, step=step).restore(
        prefix
    ).expect_partial().assert_existing_objects_matched()
    metadata = {
        "embedding_dim": config["embedding_dim"],
        "inner_unroll_length": config["model"]["inner_unroll_length"],
        "finetuning_unroll_length": config["model"]["finetuning_unroll_length"],
        "num_latents": config["model"]["num_latents"],
        "checkpoint": str(prefix),
        "checkpoint_step": int(step.numpy()),
        "training_config": config,
        "inputs": {"support": "float32 [N, K, D]", "query": "float32 [M, D]"},
        "outputs": {"logits": "float32 [M, N]", "probabilities": "float32 [M, N]"},
    }
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(
        tempfile.mkdtemp(prefix=f".{export_dir.name}.tmp-", dir=export_dir.parent)
    )
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private
    try:
        with tempfile.TemporaryDirectory() as scratch:
            module = build_serving_module(
                model, metadata, pathlib.Path(scratch) / METADATA_ASSET
            )
            _save(module, staging)
        if export_dir.exists():
            retired = export_dir.with_name(f".{export_dir.name}.old-{os.getpid()}")
            os.replace(export_dir, retired)
            os.replace(staging, export_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, export_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    logging.info(
        "Exported %s (step %d) to %s", prefix, metadata["checkpoint_step"], export_dir
    )
    return export_dir


def main(argv):
    if len(argv) > 1:
        raise cli.Failure(f"unexpected arguments: {' '.join(argv[1:])}")
    values = flags.FLAGS
    if not values.export_dir:
        raise cli.Failure("--export_dir is required")
    from leo_tf import checkpoints  # pylint: disable=g-import-not-at-top

    with cli.reported(ExportError, checkpoints.CheckpointError):
        path = export(
            values.checkpoint_path,
            values.export_dir,
            values.checkpoint,
            values.overwrite,
        )
    print(f"SavedModel written to {path}")


def run(argv=None):
    """Console entry point `leo-export`."""
    cli.run("leo_tf.export", main, argv)


if __name__ == "__main__":
    run()
