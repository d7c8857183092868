"""Flags of the leo_tf commands and the typed configuration they become.

Every flag is a field of a frozen dataclass, written once: `option(default,
help, *checks)` holds its default, its help and the rules its value obeys.
A command-line module defines its flags from its dataclasses
(`define_flags_of`), builds them from the parsed flags (`values_of`) and
checks them (`check`): each field's rules, then the cross-field rules the
class lists in `RULES`. The rest of leo_tf takes the dataclasses and never
touches FLAGS, so the model and data code work from a notebook or a test
without absl. Importing this module imports no TensorFlow: bad flags are
reported before it loads.

The configuration of `python -m leo_tf.train` (RunConfig) keeps every flag
of the authors' `config.py` and `runner.py` with its name and default;
leo_tf adds a few (marked "leo_tf:" in their help). Checks that need the
disk (the data set exists, --checkpoint_path is a directory) are made where
the data and the run directory are opened.
"""

import dataclasses
import math
import os
import typing
from typing import ClassVar

from absl import flags

from leo_tf import paths

EMBEDDING_CROPS = ("center", "multiview")
DISTRIBUTIONS = ("none", "mirrored", "multi_worker")
# Dropout decisions compare 16-bit random integers with the rate (see
# noise.keep_mask), so the smallest non-zero rate they resolve is 2^-16.
DROPOUT_LEVELS = 2**16
MIN_DROPOUT_RATE = 1 / DROPOUT_LEVELS
MAX_COUNT = 2**63 - 1  # steps and batches are int64 in TensorFlow
# Seeds reach Keras' weight initialisers, which reduce them modulo 2^31 - 2:
# larger seeds would repeat the initial weights of smaller ones.
MAX_SEED = 2**31 - 3

FLAGS = flags.FLAGS
# Flags defined by the functions below belong to the command that calls them:
# `--help` lists them as its own.
flags.disclaim_key_flags()


class ConfigError(ValueError):
    """An invalid flag value or combination; the message names the flag."""


# --- Options: dataclass fields that are flags --------------------------------


def option(default, help_text, *checks, choices=None, define=None, path=False):
    """A dataclass field that is also the flag of the same name.

    Args:
      default, help_text: the flag's default and help.
      *checks: functions of the value returning None when it is valid, else
        what it must be ("must be at least 1").
      choices: the values of an enum flag (and the only valid ones).
      define: the absl DEFINE function, where the type does not say it
        (bool, int, float, str and tuples of str, a comma-separated list, do).
      path: the value names a file or directory: a leading `~` or `~user`
        becomes that home directory (`values_of`), as in --flagfile, since
        the shell leaves `--flag=~/dir` as it is.
    """
    if choices:
        checks = (*checks, one_of(choices))
    return dataclasses.field(
        default=default,
        metadata={
            "help": help_text,
            "checks": checks,
            "choices": choices,
            "define": define,
            "path": path,
        },
    )


def option_fields(cls):
    """The fields of dataclass `cls` that are flags (made by `option`)."""
    return [field for field in dataclasses.fields(cls) if "help" in field.metadata]


_DEFINE = {
    bool: flags.DEFINE_boolean,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    str: flags.DEFINE_string,
}


def _define(field, flag_values):
    """Defines the flag of one option field in `flag_values`."""
    meta = field.metadata
    if meta["choices"]:
        flags.DEFINE_enum(
            field.name,
            field.default,
            list(meta["choices"]),
            meta["help"],
            flag_values=flag_values,
        )
        return
    if meta["define"]:
        define = meta["define"]
    elif typing.get_origin(field.type) is tuple:
        define = flags.DEFINE_list
    else:
        define = _DEFINE[field.type]
    default = list(field.default) if isinstance(field.default, tuple) else field.default
    define(field.name, default, meta["help"], flag_values=flag_values)


def define_flags_of(classes, flag_values=FLAGS):
    """Defines one flag per option field of the dataclasses `classes`.

    A flag already defined (by an earlier call) is left as it is.
    """
    for cls in classes:
        for field in option_fields(cls):
            if field.name not in flag_values:
                _define(field, flag_values)


def values_of(cls, flag_values=FLAGS):
    """An unchecked `cls` whose option fields hold the parsed flags' values
    (paths with `~` expanded)."""
    return cls(
        **{
            field.name: _typed(field, flag_values[field.name].value)
            for field in option_fields(cls)
        }
    )


def _typed(field, value):
    if isinstance(value, list):
        return tuple(value)
    if field.metadata["path"] and isinstance(value, str):
        return os.path.expanduser(value)
    return value


def check(config):
    """Raises ConfigError, naming the flag and its value, at the first broken
    rule: every field's checks first, then the classes' cross-field `RULES`
    (of nested dataclasses before those of the one holding them)."""
    configs = list(_nested(config))
    for each in configs:
        for field in option_fields(type(each)):
            value = getattr(each, field.name)
            for rule in field.metadata["checks"]:
                problem = rule(value)
                if problem:
                    raise ConfigError(f"--{field.name}={value}: {problem}")
    for each in configs:
        for rule in getattr(each, "RULES", ()):
            rule(each)


def _nested(config):
    """The dataclasses in `config`'s fields (recursively), then `config`."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            yield from _nested(value)
    yield config


def require(condition, flag, value, expectation):
    """Raises ConfigError `--flag=value: expectation` unless `condition`."""
    if not condition:
        raise ConfigError(f"--{flag}={value}: {expectation}")


# --- Checks of one value -------------------------------------------------------


def at_least(low, note=""):
    def check_at_least(value):
        return None if value >= low else f"must be at least {low}{note}"

    return check_at_least


def at_most(high, note=""):
    def check_at_most(value):
        return None if value <= high else f"must be at most {high}{note}"

    return check_at_most


def finite_at_least(low, note=""):
    def check_finite_at_least(value):
        if math.isfinite(value) and value >= low:
            return None
        return f"must be a finite number >= {low}{note}"

    return check_finite_at_least


def finite_above(low):
    def check_finite_above(value):
        if math.isfinite(value) and value > low:
            return None
        return f"must be a finite number > {low}"

    return check_finite_above


def finite_in(low, high, high_open=False):
    """The check of a finite number in [low, high], or [low, high) if
    `high_open`."""
    interval = f"[{low}, {high})" if high_open else f"[{low}, {high}]"

    def check_finite_in(value):
        below_high = value < high if high_open else value <= high
        if math.isfinite(value) and low <= value and below_high:
            return None
        return f"must be a finite number in {interval}"

    return check_finite_in


def one_of(choices):
    def check_one_of(value):
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check_one_of


def seed_range(value):
    if 0 <= value <= MAX_SEED:
        return None
    return f"must be an integer in [0, {MAX_SEED}]"


def names_a_directory(value):
    return None if value and value.strip() else "must name a directory"


def dropout_rate_range(value):
    if value == 0.0 or MIN_DROPOUT_RATE <= value < 1.0:
        return None
    return (
        f"must be 0 or in [{MIN_DROPOUT_RATE:.3g}, 1): dropout masks resolve the "
        "rate to multiples of 2^-16"
    )


# --- Flags shared by classification and regression ------------------------------

_SHARED = {
    "checkpoint_path": (
        "Directory of checkpoints, summaries and results.",
        names_a_directory,
    ),
    "num_latents": ("Width of the latent space.", at_least(1)),
    "inner_unroll_length": ("Adaptation steps in latent space.", at_least(0)),
    "finetuning_unroll_length": (
        "Adaptation steps in parameter space (finetuning).",
        at_least(0),
    ),
    "inner_lr_init": (
        "Initial learning rate of the latent inner loop.",
        finite_at_least(0),
    ),
    "finetuning_lr_init": (
        "Initial learning rate of the finetuning loop.",
        finite_at_least(0),
    ),
    "kl_weight": ("Weight of the KL term (beta).", finite_at_least(0)),
    "encoder_penalty_weight": (
        "Weight of the encoder penalty (gamma).",
        finite_at_least(0),
    ),
    "l2_penalty_weight": ("Weight of the L2 penalty (lambda_1).", finite_at_least(0)),
    "orthogonality_penalty_weight": (
        "Weight of the decoder orthogonality penalty (lambda_2).",
        finite_at_least(0),
    ),
    "outer_lr": ("Outer-loop (Adam) learning rate.", finite_above(0)),
    "gradient_threshold": (
        "Clip each gradient to [-threshold, threshold]; 0: off.",
        finite_at_least(0, " (0 disables clipping)"),
    ),
    "gradient_norm_threshold": (
        "Then clip each gradient's norm to this; 0: off.",
        finite_at_least(0, " (0 disables clipping)"),
    ),
    "metatrain_batch_size": ("Episodes (tasks) per meta-training batch.", at_least(1)),
}


def shared(name, default):
    """The option of hyperparameter `name`, with this command's default: its
    help and checks are the same in every command."""
    help_text, *checks = _SHARED[name]
    return option(default, help_text, *checks, path=name == "checkpoint_path")


# --- leo_tf.train ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of the LEO model (the authors' inner model config)."""

    num_latents: int = shared("num_latents", 64)
    inner_unroll_length: int = shared("inner_unroll_length", 5)
    finetuning_unroll_length: int = shared("finetuning_unroll_length", 5)
    inner_lr_init: float = shared("inner_lr_init", 1.0)
    finetuning_lr_init: float = shared("finetuning_lr_init", 0.001)
    dropout_rate: float = option(
        0.5, "Probability of dropping a unit.", dropout_rate_range
    )
    kl_weight: float = shared("kl_weight", 1e-3)
    encoder_penalty_weight: float = shared("encoder_penalty_weight", 1e-9)
    l2_penalty_weight: float = shared("l2_penalty_weight", 1e-8)
    orthogonality_penalty_weight: float = shared("orthogonality_penalty_weight", 1e-3)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The outer-loop optimiser: Adam with per-tensor clipping."""

    outer_lr: float = shared("outer_lr", 1e-4)
    gradient_threshold: float = shared("gradient_threshold", 0.1)
    gradient_norm_threshold: float = shared("gradient_norm_threshold", 0.1)


def center_crops_only_for_tiered_imagenet(data):
    require(
        not (data.dataset_name == "tieredImageNet" and data.embedding_crop != "center"),
        "embedding_crop",
        data.embedding_crop,
        "tieredImageNet has center crops only",
    )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the embeddings are and how episodes are drawn from them."""

    data_path: str = option(
        None,
        "Path to the dataset. Default: the per-user cache "
        "directory, where the built-in synthetic set is written.",
        path=True,
    )
    dataset_name: str = option(
        "miniImageNet",
        "Data set under data_path: miniImageNet, tieredImageNet, "
        "synthetic, or any directory of embeddings made by leo_tf.embed.",
    )
    embedding_crop: str = option(
        "center", "Embedding crop: center or multiview.", one_of(EMBEDDING_CROPS)
    )
    train_on_val: bool = option(
        False, "Meta-train on the train and validation classes."
    )
    allow_split_overlap: bool = option(
        False,
        "leo_tf: accept train, val and test splits that share classes or "
        "identical examples (refused by default: a leak between the splits).",
    )
    num_classes: int = option(
        5,
        "N in N-way classification.",
        at_least(2, " (N in N-way classification)"),
    )
    num_tr_examples_per_class: int = option(
        1,
        "K in K-shot classification.",
        at_least(1, " (K in K-shot classification)"),
    )
    num_val_examples_per_class: int = option(
        15, "Query examples per class in meta-training episodes.", at_least(1)
    )
    metatrain_batch_size: int = shared("metatrain_batch_size", 12)
    metavalid_batch_size: int = option(
        200, "Episodes per meta-validation batch.", at_least(1)
    )
    metatest_batch_size: int = option(200, "Episodes per meta-test batch.", at_least(1))
    # Meta-validation and meta-test use all remaining examples of each class,
    # up to this many examples per class in all (the authors' constant).
    total_examples_per_class: int = 600

    RULES: ClassVar[tuple] = (center_crops_only_for_tiered_imagenet,)


def counts_positive_when_training(train):
    """Steps and intervals matter only when training (the authors' evaluation
    passed --checkpoint_steps=0)."""
    if train.evaluation_mode:
        return
    for name in ("num_steps_limit", "checkpoint_steps", "summary_steps"):
        value = getattr(train, name)
        require(value >= 1, name, value, "must be at least 1 when training")


_INT64 = at_most(MAX_COUNT, " (steps and batches are counted in int64)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, checkpoints, summaries, evaluation."""

    checkpoint_path: str = shared("checkpoint_path", "/tmp/leo")
    num_steps_limit: int = option(100000, "Meta-training steps to run.", _INT64)
    checkpoint_steps: int = option(
        1000, "Save, meta-validate and log every this many steps."
    )
    summary_steps: int = option(
        100,
        "leo_tf: write training summaries and the progress line every this many "
        "steps.",
    )
    evaluation_mode: bool = option(
        False,
        "Only evaluate the best (else latest) checkpoint on the meta-test split.",
    )
    evaluate_after_training: bool = option(
        False, "leo_tf: run the meta-test evaluation when training ends."
    )
    seed: int = option(
        0, "leo_tf: seed of initialisation, episodes and noise.", seed_range
    )
    jit_compile: bool = option(False, "leo_tf: compile the steps with XLA.")
    num_towers: int = option(
        0,
        "leo_tf: split each meta-batch into this many parts computed side by "
        "side; 0: one per CPU core without a GPU, else 1. Under --distribution "
        "each replica trains its share as one tower; the towers then split "
        "evaluation batches only.",
        at_least(0, " (0: automatic)"),
    )
    distribution: str = option(
        "none",
        "leo_tf: none, mirrored (all local devices) or multi_worker (TF_CONFIG).",
        choices=DISTRIBUTIONS,
    )
    num_metavalid_batches: int = 10
    fixed_metavalid_batches: bool = option(
        False,
        "leo_tf: estimate meta-validation accuracy on the same batches at every "
        "checkpoint (default off: new batches each time, as the authors).",
    )
    num_metatest_episodes: int = option(
        10000,
        "leo_tf: meta-test episodes to average over (the authors' 10000), "
        "drawn in batches of metatest_batch_size, the last one trimmed; at "
        "least 2, for a 95% interval.",
        at_least(2),
        _INT64,
    )

    RULES: ClassVar[tuple] = (counts_positive_when_training,)


def towers_divide_batch_sizes(config):
    towers = config.train.num_towers
    for name in ("metatrain_batch_size", "metavalid_batch_size", "metatest_batch_size"):
        size = getattr(config.data, name)
        require(
            towers == 0 or size % towers == 0,
            "num_towers",
            towers,
            f"must divide --{name}={size}",
        )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one run of `leo_tf.train` needs."""

    model: ModelConfig
    optimizer: OptimizerConfig
    data: DataConfig
    train: TrainConfig

    RULES: ClassVar[tuple] = (towers_divide_batch_sizes,)

    def to_dict(self):
        return dataclasses.asdict(self)


SECTIONS = tuple((field.name, field.type) for field in dataclasses.fields(RunConfig))


def define_flags(flag_values=FLAGS):
    """Defines the flags of `leo_tf.train` (once) in `flag_values`.

    Called by the command-line modules that take them (train, search,
    export), so that importing this module defines no flag and other
    programs (leo_tf.regression, leo_tf.embed) may use the same names.
    """
    define_flags_of([cls for _, cls in SECTIONS], flag_values)


def train_flag_names():
    """The names of leo_tf.train's flags, in the order of the sections."""
    return [field.name for _, cls in SECTIONS for field in option_fields(cls)]


def from_flags(values=FLAGS):
    """Checked RunConfig from parsed absl flags; raises ConfigError.

    An unset --data_path becomes the per-user cache directory.
    """
    sections = {name: values_of(cls, values) for name, cls in SECTIONS}
    if sections["data"].data_path is None:
        sections["data"] = dataclasses.replace(
            sections["data"], data_path=str(paths.default_data_path())
        )
    config = RunConfig(**sections)
    check(config)
    return config
