"""The configuration of few-shot regression: one frozen dataclass.

Each field is a flag of `python -m leo_tf.regression` of the same name, whose
default and help are written here once (`__main__` defines the flags from the
fields). `validate` checks a configuration before anything is written or
trained, with one line per problem naming the flag. No TensorFlow here.
"""

import dataclasses

from leo_tf import cli


class ConfigError(ValueError):
    """A flag's value cannot work; the message names the flag."""


def _field(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class RegressionConfig:
    """Tasks, both models, meta-training and evaluation of one run."""

    # The run.
    checkpoint_path: str = _field(
        "runs/regression", "Run directory: checkpoints, summaries, results."
    )
    seed: int = _field(0, "Seed of initialisation, tasks and noise.")
    evaluation_mode: bool = _field(
        False, "Only evaluate the latest checkpoint under --checkpoint_path."
    )
    # Tasks.
    num_shots: int = _field(5, "K, support points per task.")
    num_query_points: int = _field(10, "Query points per meta-training task.")
    noise_stddev: float = _field(0.3, "Stddev of the observation noise on y.")
    # The regressor and LEO.
    hidden_units: int = _field(40, "Units in each of the regressor's 2 hidden layers.")
    num_latents: int = _field(16, "Width of LEO's latent space.")
    inner_unroll_length: int = _field(5, "LEO's adaptation steps in latent space.")
    finetuning_unroll_length: int = _field(
        0, "LEO's finetuning steps on the generated parameters (0: none)."
    )
    inner_lr_init: float = _field(0.1, "Initial learning rate of the latent steps.")
    finetuning_lr_init: float = _field(
        0.001, "Initial learning rate of the finetuning steps."
    )
    inner_gradient_norm_threshold: float = _field(
        10.0, "Clip each task's gradient norm in both models' inner loops (0: off)."
    )
    kl_weight: float = _field(0.01, "Weight of LEO's KL term.")
    encoder_penalty_weight: float = _field(1e-6, "Weight of the encoder penalty.")
    l2_penalty_weight: float = _field(1e-8, "Weight of the L2 penalty.")
    orthogonality_penalty_weight: float = _field(
        1e-3, "Weight of the decoder's orthogonality penalty."
    )
    # The baseline.
    maml_inner_lr: float = _field(0.01, "MAML's (fixed) adaptation learning rate.")
    maml_inner_steps: int = _field(5, "MAML's adaptation steps.")
    # Meta-training (both models, on the same tasks).
    metatrain_batch_size: int = _field(16, "Tasks per meta-training step.")
    num_steps_limit: int = _field(3000, "Meta-training steps.")
    outer_lr: float = _field(1e-3, "Adam learning rate of both models.")
    gradient_threshold: float = _field(
        0.1, "Clip each gradient tensor to +-this (0: off)."
    )
    gradient_norm_threshold: float = _field(
        0.1, "Then clip each gradient tensor's norm to this (0: off)."
    )
    checkpoint_steps: int = _field(500, "Steps between checkpoints and figures.")
    summary_steps: int = _field(100, "Steps between TensorBoard scalars.")
    # Evaluation.
    num_eval_tasks: int = _field(1000, "Held-out tasks of the final evaluation.")
    num_eval_query_points: int = _field(100, "Query points per held-out task.")
    num_prediction_samples: int = _field(
        10, "Sampled LEO adaptations per task for the NLL and the figure."
    )
    num_figure_tasks: int = _field(5, "Held-out tasks in the figure.")

    def to_dict(self):
        return dataclasses.asdict(self)


def help_text(field):
    """The help string of a RegressionConfig field."""
    return field.metadata["help"]


# Fields the model's variables depend on: a checkpoint needs the same values.
ARCHITECTURE_FIELDS = ("hidden_units", "num_latents")
# What may change when a run resumes: its length, its logging and its
# evaluation. Every other field shapes the training and must stay as saved.
FREE_ON_RESUME = (
    "checkpoint_path",
    "evaluation_mode",
    "num_steps_limit",
    "checkpoint_steps",
    "summary_steps",
    "num_eval_tasks",
    "num_eval_query_points",
    "num_prediction_samples",
    "num_figure_tasks",
)

_POSITIVE = (
    "num_shots",
    "num_query_points",
    "hidden_units",
    "num_latents",
    "metatrain_batch_size",
    "num_steps_limit",
    "outer_lr",
    "checkpoint_steps",
    "summary_steps",
    "num_eval_tasks",
    "num_eval_query_points",
    "num_prediction_samples",
    "num_figure_tasks",
    "noise_stddev",
)
_NON_NEGATIVE = (
    "inner_unroll_length",
    "finetuning_unroll_length",
    "inner_lr_init",
    "finetuning_lr_init",
    "kl_weight",
    "encoder_penalty_weight",
    "l2_penalty_weight",
    "orthogonality_penalty_weight",
    "inner_gradient_norm_threshold",
    "maml_inner_lr",
    "maml_inner_steps",
    "gradient_threshold",
    "gradient_norm_threshold",
)
_EVAL_BATCH_LIMIT = 100  # held-out tasks per evaluation batch


def validate(config):
    """Raises ConfigError, naming the flag, for the first value that cannot work."""
    if not 0 <= config.seed <= cli.MAX_SEED:
        raise ConfigError(f"--seed={config.seed}: {cli.SEED_RULE}")
    for name in _POSITIVE:
        value = getattr(config, name)
        if not value > 0:
            raise ConfigError(f"--{name}={value}: must be > 0")
    for name in _NON_NEGATIVE:
        value = getattr(config, name)
        if not value >= 0:
            raise ConfigError(f"--{name}={value}: must be >= 0")
    if config.num_figure_tasks > min(config.num_eval_tasks, _EVAL_BATCH_LIMIT):
        raise ConfigError(
            f"--num_figure_tasks={config.num_figure_tasks}: must be at most "
            f"--num_eval_tasks={config.num_eval_tasks} and at most "
            f"{_EVAL_BATCH_LIMIT} (it draws from the first held-out batch)"
        )
    if not config.checkpoint_path:
        raise ConfigError("--checkpoint_path: must name a directory")


def eval_batch_size(config):
    """Held-out tasks per evaluation batch."""
    return min(config.num_eval_tasks, _EVAL_BATCH_LIMIT)
