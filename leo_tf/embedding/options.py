"""The configuration of `python -m leo_tf.embed`: its flags as frozen dataclasses.

Four sections, each field an `option` (leo_tf/config.py) holding its flag's
default, help and checks: SourceConfig (where the images come from),
SplitConfig (how classes are split), TrainConfig (how the embedding network
is fitted) and OutputConfig (where the pickles go), gathered in EmbedConfig.
Importing this module imports no TensorFlow, so `leo_tf.embed` reports bad
flags before it loads.
"""

import dataclasses
import math
from typing import ClassVar, Tuple

from leo_tf.config import (
    ConfigError,
    at_least,
    finite_above,
    finite_in,
    names_a_directory,
    option,
    require,
    seed_range,
)
from leo_tf.data.embeddings import SPLITS
from leo_tf.embedding import writer

# Layouts of an --image_dir (images.load_image_folder).
FOLDER_LAYOUTS = ("class", "group/class")
# Feature extractors of backbones.build_backbone.
BACKBONES = ("conv4", "wrn")
CLASS_SPLIT_RULES = ("auto", "omniglot", "random")


def exactly_one_image_source(source):
    chosen = [
        f"--{name}"
        for name in ("packed_omniglot", "image_dir", "tfds_name")
        if getattr(source, name)
    ]
    if len(chosen) != 1:
        raise ConfigError(
            "set exactly one image source: --packed_omniglot, --image_dir or "
            f"--tfds_name; found {chosen or 'none'}"
        )


def channel_count(value):
    return None if value in (0, 1, 3) else "must be 0, 1 or 3"


# conv4's four 2x2 max poolings leave no pixel of a smaller image.
CONV4_MIN_IMAGE_SIZE = 16


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Where the images come from: exactly one of the three sources."""

    packed_omniglot: str = option(
        "",
        "Packed Omniglot arrays (.npz with images, char_id, drawing, alphabet, "
        "character), e.g. ../shared/data/omniglot_28.npz.",
        path=True,
    )
    image_dir: str = option(
        "",
        "Directory of images read with TFDS' ImageFolder: DIR/<class>/<image> "
        "(--image_dir_layout=class) or DIR/<group>/<class>/<image> "
        "(--image_dir_layout=group/class, e.g. Omniglot's alphabet/character).",
        path=True,
    )
    image_dir_layout: str = option(
        "class", "Folder layout of --image_dir.", choices=FOLDER_LAYOUTS
    )
    tfds_name: str = option(
        "",
        "Registered TFDS data set with 'image' and 'label' features, e.g. "
        "omniglot (its 'alphabet' feature is used as the class group).",
    )
    tfds_splits: Tuple[str, ...] = option(
        ("train", "test"), "TFDS splits to pool before the class-level split."
    )
    tfds_data_dir: str = option(
        "", "TFDS data directory (default: TFDS' own).", path=True
    )
    tfds_download: bool = option(
        True, "Let TFDS download and prepare --tfds_name if needed."
    )
    image_size: int = option(
        0, "Resize images to this square size (0: keep).", at_least(0)
    )
    channels: int = option(
        0,
        "Convert images to 1 (grey) or 3 channels (0: keep; "
        "--image_dir images are then decoded as 3 channels).",
        channel_count,
    )

    RULES: ClassVar[tuple] = (exactly_one_image_source,)

    @property
    def is_omniglot(self) -> bool:
        return bool(self.packed_omniglot) or self.tfds_name == "omniglot"


def split_sizes_form(value):
    """Three class counts >= 1, or three fractions > 0 summing to 1 (the
    counts' sum is checked against the classes found, in splits.py)."""
    expected = (
        "must be three class counts >= 1 (e.g. 64,16,20) or three fractions "
        "> 0 summing to 1 (e.g. 0.64,0.16,0.2)"
    )
    parts = [part.strip() for part in value.split(",")]
    if len(parts) != 3:
        return expected
    if all(part.isdigit() for part in parts):
        return None if min(int(part) for part in parts) >= 1 else expected
    try:
        fractions = [float(part) for part in parts]
    except ValueError:
        return expected
    positive = all(math.isfinite(f) and f > 0 for f in fractions)
    return None if positive and abs(sum(fractions) - 1.0) <= 1e-6 else expected


def some_splits(value):
    chosen = bool(value) and set(value) <= set(SPLITS)
    return None if chosen else f"must be one or more of {', '.join(SPLITS)}"


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How classes are split (see splits.py)."""

    class_split: str = option(
        "auto",
        "omniglot: background alphabets -> train/val (--num_val_alphabets whole "
        "alphabets -> val), evaluation alphabets -> test. random: seeded class "
        "permutation cut by --split_sizes. auto: omniglot for --packed_omniglot "
        "and --tfds_name=omniglot, random otherwise.",
        choices=CLASS_SPLIT_RULES,
    )
    num_val_alphabets: int = option(
        5,
        "Omniglot split: background alphabets held out for meta-validation.",
        at_least(1),
    )
    split_sizes: str = option(
        "0.64,0.16,0.2",
        "Random split: train,val,test class counts (integers summing to the "
        "number of classes) or fractions (summing to 1).",
        split_sizes_form,
    )
    split_seed: int = option(0, "Seeds the class split.", seed_range)
    rotations: bool = option(
        False,
        "Add each class's 90/180/270-degree rotations as new "
        "classes of the same split (Vinyals et al. 2016).",
    )
    rotation_splits: Tuple[str, ...] = option(
        SPLITS,
        "The splits that --rotations extends. train: the rotated classes only "
        "train the network; meta-validation and meta-test keep the original "
        "characters.",
        some_splits,
    )


def wrn_depth_form(value):
    if value >= 10 and (value - 4) % 6 == 0:
        return None
    return "must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...)"


def some_training(train):
    """Zero epochs leave the training to the episodes: some must be asked."""
    require(
        train.epochs >= 1 or train.episodic_episodes >= 1,
        "epochs",
        train.epochs,
        "must be at least 1 unless --episodic_episodes trains the network",
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to fit the embedding network; each field is a flag of leo_tf.embed.

    The defaults are tuned for Omniglot at 28x28 with conv4 on 2 CPU cores
    (82 s of training on an idle 2-core machine): 10 epochs with shift and
    rotation augmentation gave better nearest-class-mean accuracy on the validation
    alphabets than 10 epochs without augmentation; 20 epochs were better
    still (about +2 points 20-way 1-shot on the validation alphabets) at
    twice the time.
    """

    backbone: str = option(
        "conv4",
        "conv4: 4 x (conv3x3-BN-ReLU-maxpool) + flatten, D = "
        "conv_filters * (H//16) * (W//16) (64 at 28x28). wrn: "
        "WRN-<wrn_depth>-<wrn_width> + global average pooling, "
        "D = 64 * wrn_width (640 for WRN-28-10).",
        choices=BACKBONES,
    )
    conv_filters: int = option(64, "conv4 channels per block.", at_least(1))
    wrn_depth: int = option(28, "WRN depth (6n + 4).", wrn_depth_form)
    wrn_width: int = option(10, "WRN widening factor.", at_least(1))
    epochs: int = option(
        10,
        "Training epochs over the meta-train images (0: none, the network is "
        "trained by the --episodic_episodes alone).",
        at_least(0),
    )
    batch_size: int = option(128, "Images per training step.", at_least(1))
    learning_rate: float = option(
        3e-3,
        "Adam's initial learning rate (cosine-decayed to 0).",
        finite_above(0.0),
    )
    label_smoothing: float = option(
        0.0,
        "Label smoothing of the softmax cross-entropy.",
        finite_in(0, 1, high_open=True),
    )
    augment_shift: float = option(
        0.1,
        "Training augmentation: maximum random shift, a fraction "
        "of height and width (0: off).",
        finite_in(0, 1),
    )
    augment_rotation: float = option(
        10.0,
        "Training augmentation: maximum random rotation in degrees (0: off).",
        finite_in(0, 180),
    )
    augment_zoom: float = option(
        0.0,
        "Training augmentation: maximum random zoom, a fraction (0: off).",
        finite_in(0, 1, high_open=True),
    )
    episodic_episodes: int = option(
        0,
        "After the supervised epochs, fine-tune the feature extractor on this "
        "many few-shot episodes of the train classes with a prototypical "
        "cosine loss (see embedding/episodic.py; 0: off).",
        at_least(0),
    )
    episodic_ways: int = option(60, "Classes per fine-tuning episode.", at_least(2))
    episodic_shots: int = option(
        1, "Support images per class of a fine-tuning episode.", at_least(1)
    )
    episodic_queries: int = option(
        5, "Query images per class of a fine-tuning episode.", at_least(1)
    )
    episodic_learning_rate: float = option(
        1e-4,
        "Adam's initial learning rate for the fine-tuning episodes "
        "(cosine-decayed to 0).",
        finite_above(0.0),
    )
    episodic_scale: float = option(
        50.0,
        "Initial value of the learned scale of the episodes' cosine logits.",
        finite_above(0.0),
    )
    seed: int = option(
        0,
        "Seeds weights, shuffling and augmentation; the same seed gives "
        "identical pickles.",
        seed_range,
    )

    RULES: ClassVar[tuple] = (some_training,)


def dataset_name_makes_keys(output):
    """Raises ValueError, naming --dataset_name, unless it can start keys."""
    writer.check_dataset_name(output.dataset_name)


def folder_name(value):
    """A single folder's name: not empty, no "/", not "." or ".."."""
    if value and "/" not in value and value not in (".", ".."):
        return None
    return "must be a folder's name (not empty, no '/', not '.' or '..')"


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where the pickles go: <data_path>/<dataset_name>/<embedding_crop>/."""

    data_path: str = option(
        None,
        "Root of the output: <data_path>/<dataset_name>/"
        "<embedding_crop>/<split>_embeddings.pkl.",
        names_a_directory,
        path=True,
    )
    dataset_name: str = option(
        "omniglot", "Letters and digits only; first field of every key."
    )
    embedding_crop: str = option("center", "Output sub-folder name.", folder_name)
    view_shifts: int = option(
        0,
        "Embed each image as the mean of the features of its (2s+1)^2 copies "
        "shifted by -s..s pixels down and right, edge pixels repeated "
        "(s = this value; 0: the image alone).",
        at_least(0),
    )
    overwrite: bool = option(
        False,
        "Replace the pickles and classes.json of an earlier run in the output "
        "folder (refused by default: LEO runs may read them).",
    )

    RULES: ClassVar[tuple] = (dataset_name_makes_keys,)

    def check_folder(self) -> None:
        """Raises writer.OutputError unless the pickles can be written here
        (a check of the disk: see writer.check_output_folder)."""
        writer.check_output_folder(
            self.data_path, self.dataset_name, self.embedding_crop, self.overwrite
        )


def images_fit_the_backbone(config):
    """conv4 needs --image_size 0 (keep) or at least 16."""
    size = config.source.image_size
    require(
        config.train.backbone != "conv4" or not 0 < size < CONV4_MIN_IMAGE_SIZE,
        "image_size",
        size,
        f"--backbone=conv4 needs images of at least {CONV4_MIN_IMAGE_SIZE}x"
        f"{CONV4_MIN_IMAGE_SIZE} (four 2x2 poolings)",
    )


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """Everything one run of `leo_tf.embed` needs."""

    source: SourceConfig
    split: SplitConfig
    train: TrainConfig
    output: OutputConfig

    RULES: ClassVar[tuple] = (images_fit_the_backbone,)
