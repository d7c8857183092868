r"""`python -m leo_tf.embed`: train an embedding network, write LEO's pickles.

Trains a feature extractor by supervised classification on the meta-TRAIN
classes only, then writes

    <data_path>/<dataset_name>/<embedding_crop>/{train,val,test}_embeddings.pkl
    <data_path>/<dataset_name>/<embedding_crop>/classes.json

in the format `python -m leo_tf.train` reads (see leo_tf/embedding/writer.py),
and prints the classes and images per class it found in each split. If that
folder already holds these files, from an earlier run that LEO runs may
read, it refuses before training unless --overwrite is given, which replaces
them.

The class split is clean: meta-train, meta-validation and meta-test share no
class, and only meta-train images are used to fit the network. With
--class_split=auto, Omniglot sources use Omniglot's standard split
(background alphabets -> meta-train, minus --num_val_alphabets whole
alphabets held out for meta-validation; evaluation alphabets -> meta-test);
other sources a seeded random class split by --split_sizes.

Example (Omniglot, 28x28, conv4 -> 64-d embeddings):

    python -m leo_tf.embed --packed_omniglot=../shared/data/omniglot_28.npz \
        --data_path=/tmp/leo_data --dataset_name=omniglot

    python -m leo_tf.train --data_path=/tmp/leo_data --dataset_name=omniglot \
        --embedding_crop=center ...   (with the embedding dimension D printed)

The flags are the fields of the frozen config objects of
leo_tf/embedding/options.py, defined and read here; they are kept out of
leo_tf/config.py's RunConfig so the training command does not carry them.
Bad flags, and an output folder that cannot be written or holds an earlier
run's files, are reported before TensorFlow is imported.
"""

import dataclasses

from absl import flags
from absl import logging

from leo_tf import cli
from leo_tf import config as config_lib
from leo_tf.embedding import options
from leo_tf.embedding import writer

# The sections of EmbedConfig, whose fields are the flags.
SECTIONS = tuple(
    (field.name, field.type) for field in dataclasses.fields(options.EmbedConfig)
)


def define_flags(flag_values=flags.FLAGS):
    """One flag per field of EmbedConfig's sections: name, default and help."""
    config_lib.define_flags_of([cls for _, cls in SECTIONS], flag_values)


def config_from_flags(flag_values=flags.FLAGS) -> options.EmbedConfig:
    """The checked configuration that the flags describe (ConfigError)."""
    config = options.EmbedConfig(
        **{name: config_lib.values_of(cls, flag_values) for name, cls in SECTIONS}
    )
    config_lib.check(config)
    return config


def main(argv):
    if len(argv) > 1:
        raise cli.Failure(f"unexpected arguments: {' '.join(argv[1:])}")
    with cli.reported(ValueError):  # before TensorFlow is even imported
        config = config_from_flags()
        config.output.check_folder()
    # pylint: disable=g-import-not-at-top
    from leo_tf.embedding import episodic, images, pipeline, splits

    # pylint: enable=g-import-not-at-top
    with cli.reported(
        images.ImageSourceError,
        splits.SplitError,
        episodic.EpisodeError,
        writer.OutputError,
    ):
        result = pipeline.run(config)
    print(f"class split: {result.split_rule}")
    for split, summary in result.splits.items():
        print(
            f"{pipeline.describe_counts(split, summary.counts)} -> " f"{summary.path}"
        )
    print(
        f"embedding network trained on the {len(result.head_class_ids)} "
        f"train classes; embedding_dim D = {result.embedding_dim}"
    )
    print(
        "wall time: "
        + ", ".join(f"{stage} {secs:.1f} s" for stage, secs in result.seconds.items())
    )
    logging.info("class names per id: %s", result.classes_path)


def run(argv=None):
    """Console entry point."""
    define_flags()
    flags.mark_flag_as_required("data_path")
    cli.run("leo_tf.embed", main, argv)


if __name__ == "__main__":
    run()
