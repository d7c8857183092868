"""Flags of `python -m leo_tf.train` and the typed configuration they become.

Every flag of the authors' `config.py` and `runner.py` keeps its name and
default; leo_tf adds a few (marked "leo_tf:" in their help). The command-line
modules define them with `define_flags`, and they are read here only:
`from_flags` validates them and returns frozen dataclasses, which
every other module takes instead of touching FLAGS, so the model and data code
work from a notebook or a test without absl.
"""

import dataclasses
import math
import os

from absl import flags

from leo_tf import cli, paths

KNOWN_DATASETS = ("miniImageNet", "tieredImageNet", "synthetic")
EMBEDDING_CROPS = ("center", "multiview")
DISTRIBUTIONS = ("none", "mirrored", "multi_worker")
# Dropout decisions compare 16-bit random integers with the rate (see
# noise.keep_mask), so the smallest non-zero rate they resolve is 2^-16.
DROPOUT_LEVELS = 2**16
MIN_DROPOUT_RATE = 1 / DROPOUT_LEVELS
_MAX_COUNT = 2**63 - 1  # steps and batches are int64 in TensorFlow


def define_flags():
    """Defines the flags of `leo_tf.train` in absl's FLAGS, once.

    Called by the command-line modules that take them (train, search,
    export), so that importing the configuration defines no flag and other
    programs (leo_tf.regression) may use the same names.
    """
    if "fixed_metavalid_batches" in flags.FLAGS:  # defined already
        return
    # --- The authors' config.py -------------------------------------------------
    flags.DEFINE_string(
        "data_path",
        None,
        "Path to the dataset. Default: the per-user cache "
        "directory, where the built-in synthetic set is written.",
    )
    flags.DEFINE_string(
        "dataset_name",
        "miniImageNet",
        "Data set under data_path: miniImageNet, tieredImageNet, "
        "synthetic, or any directory of embeddings made by "
        "leo_tf.embed.",
    )
    flags.DEFINE_string(
        "embedding_crop", "center", "Embedding crop: center or multiview."
    )
    flags.DEFINE_boolean(
        "train_on_val", False, "Meta-train on the train and validation classes."
    )
    flags.DEFINE_integer("inner_unroll_length", 5, "Adaptation steps in latent space.")
    flags.DEFINE_integer(
        "finetuning_unroll_length",
        5,
        "Adaptation steps in parameter space (finetuning).",
    )
    flags.DEFINE_integer("num_latents", 64, "Width of the latent space.")
    flags.DEFINE_float(
        "inner_lr_init", 1.0, "Initial learning rate of the latent inner loop."
    )
    flags.DEFINE_float(
        "finetuning_lr_init", 0.001, "Initial learning rate of the finetuning loop."
    )
    flags.DEFINE_float("dropout_rate", 0.5, "Probability of dropping a unit.")
    flags.DEFINE_float("kl_weight", 1e-3, "Weight of the KL term (beta).")
    flags.DEFINE_float(
        "encoder_penalty_weight", 1e-9, "Weight of the encoder penalty (gamma)."
    )
    flags.DEFINE_float(
        "l2_penalty_weight", 1e-8, "Weight of the L2 penalty (lambda_1)."
    )
    flags.DEFINE_float(
        "orthogonality_penalty_weight",
        1e-3,
        "Weight of the decoder orthogonality penalty (lambda_2).",
    )
    flags.DEFINE_integer("num_classes", 5, "N in N-way classification.")
    flags.DEFINE_integer("num_tr_examples_per_class", 1, "K in K-shot classification.")
    flags.DEFINE_integer(
        "num_val_examples_per_class",
        15,
        "Query examples per class in meta-training episodes.",
    )
    flags.DEFINE_integer(
        "metatrain_batch_size", 12, "Episodes per meta-training batch."
    )
    flags.DEFINE_integer(
        "metavalid_batch_size", 200, "Episodes per meta-validation batch."
    )
    flags.DEFINE_integer("metatest_batch_size", 200, "Episodes per meta-test batch.")
    flags.DEFINE_integer("num_steps_limit", int(1e5), "Meta-training steps to run.")
    flags.DEFINE_float("outer_lr", 1e-4, "Outer-loop (Adam) learning rate.")
    flags.DEFINE_float(
        "gradient_threshold",
        0.1,
        "Clip each gradient to [-threshold, threshold]; 0: off.",
    )
    flags.DEFINE_float(
        "gradient_norm_threshold",
        0.1,
        "Then clip each gradient's norm to this; 0: off.",
    )
    # --- The authors' runner.py -------------------------------------------------
    flags.DEFINE_string(
        "checkpoint_path",
        "/tmp/leo",
        "Directory of checkpoints, summaries and results.",
    )
    flags.DEFINE_integer(
        "checkpoint_steps", 1000, "Save, meta-validate and log every this many steps."
    )
    flags.DEFINE_boolean(
        "evaluation_mode",
        False,
        "Only evaluate the best (else latest) checkpoint on the " "meta-test split.",
    )
    # --- leo_tf additions --------------------------------------------------------
    flags.DEFINE_integer(
        "seed", 0, "leo_tf: seed of initialisation, episodes and noise."
    )
    flags.DEFINE_boolean(
        "evaluate_after_training",
        False,
        "leo_tf: run the meta-test evaluation when training ends.",
    )
    flags.DEFINE_integer(
        "summary_steps",
        100,
        "leo_tf: write training summaries and the progress line "
        "every this many steps.",
    )
    flags.DEFINE_boolean("jit_compile", False, "leo_tf: compile the steps with XLA.")
    flags.DEFINE_integer(
        "num_towers",
        0,
        "leo_tf: split each meta-batch into this many parts computed side by "
        "side; 0: one per CPU core without a GPU, else 1.",
    )
    flags.DEFINE_integer(
        "num_metatest_episodes",
        10000,
        "leo_tf: meta-test episodes to average over (the authors' 10000), in "
        "whole batches of metatest_batch_size.",
    )
    flags.DEFINE_boolean(
        "fixed_metavalid_batches",
        False,
        "leo_tf: estimate meta-validation accuracy on the same batches at every "
        "checkpoint (default, as the authors: new batches each time).",
    )
    flags.DEFINE_enum(
        "distribution",
        "none",
        DISTRIBUTIONS,
        "leo_tf: none, mirrored (all local devices) or " "multi_worker (TF_CONFIG).",
    )
    flags.DEFINE_boolean(
        "allow_split_overlap",
        False,
        "leo_tf: accept train, val and test splits that share classes or "
        "identical examples (refused by default: a leak between the splits).",
    )


FLAGS = flags.FLAGS


class ConfigError(ValueError):
    """An invalid flag value or combination; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of the LEO model (the authors' inner model config)."""

    num_latents: int = 64
    inner_unroll_length: int = 5
    finetuning_unroll_length: int = 5
    inner_lr_init: float = 1.0
    finetuning_lr_init: float = 0.001
    dropout_rate: float = 0.5
    kl_weight: float = 1e-3
    encoder_penalty_weight: float = 1e-9
    l2_penalty_weight: float = 1e-8
    orthogonality_penalty_weight: float = 1e-3


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The outer-loop optimiser: Adam with per-tensor clipping."""

    outer_lr: float = 1e-4
    gradient_threshold: float = 0.1
    gradient_norm_threshold: float = 0.1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the embeddings are and how episodes are drawn from them."""

    data_path: str
    dataset_name: str = "miniImageNet"
    embedding_crop: str = "center"
    train_on_val: bool = False
    allow_split_overlap: bool = False
    num_classes: int = 5
    num_tr_examples_per_class: int = 1
    num_val_examples_per_class: int = 15
    metatrain_batch_size: int = 12
    metavalid_batch_size: int = 200
    metatest_batch_size: int = 200
    # Meta-validation and meta-test use all remaining examples of each class,
    # up to this many examples per class in all (the authors' constant).
    total_examples_per_class: int = 600


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, checkpoints, summaries, evaluation."""

    checkpoint_path: str = "/tmp/leo"
    num_steps_limit: int = 100000
    checkpoint_steps: int = 1000
    summary_steps: int = 100
    evaluation_mode: bool = False
    evaluate_after_training: bool = False
    seed: int = 0
    jit_compile: bool = False
    num_towers: int = 0
    distribution: str = "none"
    num_metavalid_batches: int = 10
    fixed_metavalid_batches: bool = False
    num_metatest_episodes: int = 10000


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one run of `leo_tf.train` needs."""

    model: ModelConfig
    optimizer: OptimizerConfig
    data: DataConfig
    train: TrainConfig

    def to_dict(self):
        return dataclasses.asdict(self)


def from_flags(values=FLAGS):
    """Validated RunConfig from parsed absl flags; raises ConfigError."""
    model = ModelConfig(
        **{f.name: values[f.name].value for f in dataclasses.fields(ModelConfig)}
    )
    optimizer = OptimizerConfig(
        **{f.name: values[f.name].value for f in dataclasses.fields(OptimizerConfig)}
    )
    data_fields = {
        f.name: values[f.name].value
        for f in dataclasses.fields(DataConfig)
        if f.name in values and f.name != "data_path"
    }
    data = DataConfig(
        data_path=values.data_path or str(paths.default_data_path()), **data_fields
    )
    train = TrainConfig(
        **{
            f.name: values[f.name].value
            for f in dataclasses.fields(TrainConfig)
            if f.name in values
        }
    )
    config = RunConfig(model=model, optimizer=optimizer, data=data, train=train)
    validate(config)
    return config


def _require(condition, flag, value, expectation):
    if not condition:
        raise ConfigError(f"--{flag}={value}: {expectation}")


def validate(config):
    """Raises ConfigError, naming the flag, for invalid values or combinations.

    Reads no data and writes nothing; it only lists data_path for an unknown
    dataset_name.
    """
    model, optimizer, data, train = (
        config.model,
        config.optimizer,
        config.data,
        config.train,
    )
    _require(
        model.num_latents >= 1, "num_latents", model.num_latents, "must be at least 1"
    )
    for name in ("inner_unroll_length", "finetuning_unroll_length"):
        _require(
            getattr(model, name) >= 0, name, getattr(model, name), "must be at least 0"
        )
    _require(
        model.dropout_rate == 0.0 or MIN_DROPOUT_RATE <= model.dropout_rate < 1.0,
        "dropout_rate",
        model.dropout_rate,
        f"must be 0 or in [{MIN_DROPOUT_RATE:.3g}, 1): dropout masks resolve "
        "the rate to multiples of 2^-16",
    )
    for name in (
        "inner_lr_init",
        "finetuning_lr_init",
        "kl_weight",
        "encoder_penalty_weight",
        "l2_penalty_weight",
        "orthogonality_penalty_weight",
    ):
        value = getattr(model, name)
        _require(
            math.isfinite(value) and value >= 0,
            name,
            value,
            "must be a finite number >= 0",
        )
    _require(
        math.isfinite(optimizer.outer_lr) and optimizer.outer_lr > 0,
        "outer_lr",
        optimizer.outer_lr,
        "must be a finite number > 0",
    )
    for name in ("gradient_threshold", "gradient_norm_threshold"):
        value = getattr(optimizer, name)
        _require(
            math.isfinite(value) and value >= 0,
            name,
            value,
            "must be a finite number >= 0 (0 disables clipping)",
        )

    _require(
        data.num_classes >= 2,
        "num_classes",
        data.num_classes,
        "must be at least 2 (N in N-way classification)",
    )
    _require(
        data.num_tr_examples_per_class >= 1,
        "num_tr_examples_per_class",
        data.num_tr_examples_per_class,
        "must be at least 1 (K in K-shot classification)",
    )
    _require(
        data.num_val_examples_per_class >= 1,
        "num_val_examples_per_class",
        data.num_val_examples_per_class,
        "must be at least 1",
    )
    for name in ("metatrain_batch_size", "metavalid_batch_size", "metatest_batch_size"):
        _require(
            getattr(data, name) >= 1, name, getattr(data, name), "must be at least 1"
        )
    _require(
        data.embedding_crop in EMBEDDING_CROPS,
        "embedding_crop",
        data.embedding_crop,
        f"must be one of {', '.join(EMBEDDING_CROPS)}",
    )
    _require(
        not (data.dataset_name == "tieredImageNet" and data.embedding_crop != "center"),
        "embedding_crop",
        data.embedding_crop,
        "tieredImageNet has center crops only",
    )
    available = available_datasets(data.data_path)
    _require(
        data.dataset_name in available,
        "dataset_name",
        data.dataset_name,
        "unknown data set; available: " + ", ".join(available),
    )

    if not train.evaluation_mode:
        _require(
            train.num_steps_limit >= 1,
            "num_steps_limit",
            train.num_steps_limit,
            "must be at least 1 when training",
        )
        _require(
            train.checkpoint_steps >= 1,
            "checkpoint_steps",
            train.checkpoint_steps,
            "must be at least 1 when training",
        )
        _require(
            train.summary_steps >= 1,
            "summary_steps",
            train.summary_steps,
            "must be at least 1 when training",
        )
    for name in ("num_steps_limit", "num_metatest_episodes"):
        _require(
            getattr(train, name) <= _MAX_COUNT,
            name,
            getattr(train, name),
            f"must be at most {_MAX_COUNT} (steps and batches are counted in int64)",
        )
    _require(
        0 <= train.seed <= cli.MAX_SEED,
        "seed",
        train.seed,
        cli.SEED_RULE,
    )
    _require(
        train.num_towers >= 0,
        "num_towers",
        train.num_towers,
        "must be at least 0 (0: automatic)",
    )
    for name in ("metatrain_batch_size", "metavalid_batch_size", "metatest_batch_size"):
        _require(
            train.num_towers == 0 or getattr(data, name) % train.num_towers == 0,
            "num_towers",
            train.num_towers,
            f"must divide --{name}={getattr(data, name)}",
        )
    _require(
        train.num_metatest_episodes >= 1,
        "num_metatest_episodes",
        train.num_metatest_episodes,
        "must be at least 1",
    )
    _require(
        train.distribution in DISTRIBUTIONS,
        "distribution",
        train.distribution,
        f"must be one of {', '.join(DISTRIBUTIONS)}",
    )
    _require(
        bool(train.checkpoint_path),
        "checkpoint_path",
        train.checkpoint_path,
        "must name a directory",
    )
    _require(
        not os.path.exists(train.checkpoint_path)
        or os.path.isdir(train.checkpoint_path),
        "checkpoint_path",
        train.checkpoint_path,
        "exists and is not a directory",
    )


def available_datasets(data_path):
    """The built-in data set names plus the directories under data_path."""
    custom = []
    if data_path and os.path.isdir(data_path):
        custom = sorted(
            entry
            for entry in os.listdir(data_path)
            if os.path.isdir(os.path.join(data_path, entry))
            and entry not in KNOWN_DATASETS
            and not entry.startswith(".")
        )
    return (*KNOWN_DATASETS, *custom)
