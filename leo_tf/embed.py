r"""`python -m leo_tf.embed`: train an embedding network, write LEO's pickles.

Trains a feature extractor by supervised classification on the meta-TRAIN
classes only, then writes

    <data_path>/<dataset_name>/<embedding_crop>/{train,val,test}_embeddings.pkl
    <data_path>/<dataset_name>/<embedding_crop>/classes.json

in the format `python -m leo_tf.train` reads (see leo_tf/embedding/writer.py),
and prints the classes and images per class it found in each split.

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

Flags are read here, once, and turned into the frozen config objects of
leo_tf/embedding/pipeline.py; they are kept out of leo_tf/config.py so the
training command does not carry them.
"""

from absl import flags
from absl import logging

from leo_tf import cli
from leo_tf.embedding import backbones
from leo_tf.embedding import images
from leo_tf.embedding import pipeline
from leo_tf.embedding import pretrain
from leo_tf.embedding import splits

# Image source: exactly one of --packed_omniglot, --image_dir, --tfds_name.
flags.DEFINE_string(
    "packed_omniglot",
    "",
    "Packed Omniglot arrays (.npz with images, char_id, drawing, alphabet, "
    "character), e.g. ../shared/data/omniglot_28.npz.",
)
flags.DEFINE_string(
    "image_dir",
    "",
    "Directory of images read with TFDS' ImageFolder: DIR/<class>/<image> "
    "(--image_dir_layout=class) or DIR/<group>/<class>/<image> "
    "(--image_dir_layout=group/class, e.g. Omniglot's alphabet/character).",
)
flags.DEFINE_enum(
    "image_dir_layout",
    "class",
    list(images.FOLDER_LAYOUTS),
    "Folder layout of --image_dir.",
)
flags.DEFINE_string(
    "tfds_name",
    "",
    "Registered TFDS data set with 'image' and 'label' features, e.g. "
    "omniglot (its 'alphabet' feature is used as the class group).",
)
flags.DEFINE_list(
    "tfds_splits",
    ["train", "test"],
    "TFDS splits to pool before the class-level split.",
)
flags.DEFINE_string("tfds_data_dir", "", "TFDS data directory (default: TFDS' own).")
flags.DEFINE_bool(
    "tfds_download", True, "Let TFDS download and prepare --tfds_name if needed."
)
flags.DEFINE_integer("image_size", 0, "Resize images to this square size (0: keep).")
flags.DEFINE_integer(
    "channels",
    0,
    "Convert images to 1 (grey) or 3 channels (0: keep; "
    "--image_dir images are then decoded as 3 channels).",
)

# Class split.
flags.DEFINE_enum(
    "class_split",
    "auto",
    list(pipeline.CLASS_SPLIT_RULES),
    "omniglot: background alphabets -> train/val (--num_val_alphabets whole "
    "alphabets -> val), evaluation alphabets -> test. random: seeded class "
    "permutation cut by --split_sizes. auto: omniglot for --packed_omniglot "
    "and --tfds_name=omniglot, random otherwise.",
)
flags.DEFINE_integer(
    "num_val_alphabets",
    5,
    "Omniglot split: background alphabets held out for meta-validation.",
)
flags.DEFINE_string(
    "split_sizes",
    "0.64,0.16,0.2",
    "Random split: train,val,test class counts (integers summing to the "
    "number of classes) or fractions (summing to 1).",
)
flags.DEFINE_integer("split_seed", 0, "Seeds the class split.")
flags.DEFINE_bool(
    "rotations",
    False,
    "Add each class's 90/180/270-degree rotations as new "
    "classes of the same split (Vinyals et al. 2016).",
)
flags.DEFINE_list(
    "rotation_splits",
    list(splits.SPLITS),
    "The splits that --rotations extends. train: the rotated classes only "
    "train the network; meta-validation and meta-test keep the original "
    "characters.",
)

# Network and training.
flags.DEFINE_enum(
    "backbone",
    "conv4",
    list(backbones.BACKBONES),
    "conv4: 4 x (conv3x3-BN-ReLU-maxpool) + flatten, D = "
    "conv_filters * (H//16) * (W//16) (64 at 28x28). wrn: "
    "WRN-<wrn_depth>-<wrn_width> + global average pooling, "
    "D = 64 * wrn_width (640 for WRN-28-10).",
)
flags.DEFINE_integer("conv_filters", 64, "conv4 channels per block.")
flags.DEFINE_integer("wrn_depth", 28, "WRN depth (6n + 4).")
flags.DEFINE_integer("wrn_width", 10, "WRN widening factor.")
flags.DEFINE_integer(
    "epochs", pretrain.TrainConfig.epochs, "Training epochs over the meta-train images."
)
flags.DEFINE_integer(
    "batch_size", pretrain.TrainConfig.batch_size, "Images per training step."
)
flags.DEFINE_float(
    "learning_rate",
    pretrain.TrainConfig.learning_rate,
    "Adam's initial learning rate (cosine-decayed to 0).",
)
flags.DEFINE_float(
    "label_smoothing",
    pretrain.TrainConfig.label_smoothing,
    "Label smoothing of the softmax cross-entropy.",
)
flags.DEFINE_float(
    "augment_shift",
    pretrain.TrainConfig.augment_shift,
    "Training augmentation: maximum random shift, a fraction "
    "of height and width (0: off).",
)
flags.DEFINE_float(
    "augment_rotation",
    pretrain.TrainConfig.augment_rotation,
    "Training augmentation: maximum random rotation in degrees (0: off).",
)
flags.DEFINE_float(
    "augment_zoom",
    pretrain.TrainConfig.augment_zoom,
    "Training augmentation: maximum random zoom, a fraction (0: off).",
)
flags.DEFINE_integer(
    "seed",
    0,
    "Seeds weights, shuffling and augmentation; "
    "the same seed gives identical pickles.",
)

# Output.
flags.DEFINE_string(
    "data_path",
    None,
    "Root of the output: <data_path>/<dataset_name>/"
    "<embedding_crop>/<split>_embeddings.pkl.",
)
flags.DEFINE_string(
    "dataset_name", "omniglot", "Letters and digits only; first field of every key."
)
flags.DEFINE_string("embedding_crop", "center", "Output sub-folder name.")

FLAGS = flags.FLAGS


def config_from_flags() -> pipeline.EmbedConfig:
    """The frozen configuration that the flags describe (validated)."""
    return pipeline.EmbedConfig(
        source=pipeline.SourceConfig(
            packed_omniglot=FLAGS.packed_omniglot,
            image_dir=FLAGS.image_dir,
            image_dir_layout=FLAGS.image_dir_layout,
            tfds_name=FLAGS.tfds_name,
            tfds_splits=tuple(FLAGS.tfds_splits),
            tfds_data_dir=FLAGS.tfds_data_dir,
            tfds_download=FLAGS.tfds_download,
            image_size=FLAGS.image_size,
            channels=FLAGS.channels,
        ),
        split=pipeline.SplitConfig(
            rule=FLAGS.class_split,
            num_val_alphabets=FLAGS.num_val_alphabets,
            split_sizes=FLAGS.split_sizes,
            split_seed=FLAGS.split_seed,
            rotations=FLAGS.rotations,
            rotation_splits=tuple(FLAGS.rotation_splits),
        ),
        train=pretrain.TrainConfig(
            backbone=FLAGS.backbone,
            conv_filters=FLAGS.conv_filters,
            wrn_depth=FLAGS.wrn_depth,
            wrn_width=FLAGS.wrn_width,
            epochs=FLAGS.epochs,
            batch_size=FLAGS.batch_size,
            learning_rate=FLAGS.learning_rate,
            label_smoothing=FLAGS.label_smoothing,
            augment_shift=FLAGS.augment_shift,
            augment_rotation=FLAGS.augment_rotation,
            augment_zoom=FLAGS.augment_zoom,
            seed=FLAGS.seed,
        ),
        output=pipeline.OutputConfig(
            data_path=FLAGS.data_path,
            dataset_name=FLAGS.dataset_name,
            embedding_crop=FLAGS.embedding_crop,
        ),
    )


def check_seeds():
    """Raises cli.Failure for a seed flag outside the range every consumer
    takes (see cli.MAX_SEED)."""
    for name in ("seed", "split_seed"):
        value = FLAGS[name].value
        if not 0 <= value <= cli.MAX_SEED:
            raise cli.Failure(f"--{name}={value}: {cli.SEED_RULE}")


def main(argv):
    if len(argv) > 1:
        raise cli.Failure(f"unexpected arguments: {' '.join(argv[1:])}")
    check_seeds()
    with cli.reported(ValueError):
        config = config_from_flags()
    with cli.reported(images.ImageSourceError, splits.SplitError):
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
    flags.mark_flag_as_required("data_path")
    cli.run("leo_tf.embed", main, argv)


if __name__ == "__main__":
    run()
