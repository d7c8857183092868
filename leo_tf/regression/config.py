"""The configuration of few-shot regression: one frozen dataclass.

Each field is a flag of `python -m leo_tf.regression` of the same name, whose
default, help and checks are written here once (see leo_tf/config.py; the
hyperparameters it shares with leo_tf.train are defined there, with this
command's defaults here). leo_tf.config.check refuses a configuration before
anything is written or trained, in one line naming the flag. No TensorFlow
here.
"""

import dataclasses
from typing import ClassVar

from leo_tf.config import (
    at_least,
    finite_above,
    finite_at_least,
    option,
    require,
    seed_range,
    shared,
)

_EVAL_BATCH_LIMIT = 100  # held-out tasks per evaluation batch


def figure_tasks_in_first_eval_batch(config):
    limit = min(config.num_eval_tasks, _EVAL_BATCH_LIMIT)
    require(
        config.num_figure_tasks <= limit,
        "num_figure_tasks",
        config.num_figure_tasks,
        f"must be at most --num_eval_tasks={config.num_eval_tasks} and at most "
        f"{_EVAL_BATCH_LIMIT} (it draws from the first held-out batch)",
    )


@dataclasses.dataclass(frozen=True)
class RegressionConfig:
    """Tasks, both models, meta-training and evaluation of one run."""

    # The run.
    checkpoint_path: str = shared("checkpoint_path", "runs/regression")
    seed: int = option(0, "Seed of initialisation, tasks and noise.", seed_range)
    evaluation_mode: bool = option(
        False, "Only evaluate the latest checkpoint under --checkpoint_path."
    )
    # Tasks.
    num_shots: int = option(5, "K, support points per task.", at_least(1))
    num_query_points: int = option(
        10, "Query points per meta-training task.", at_least(1)
    )
    noise_stddev: float = option(
        0.3, "Stddev of the observation noise on y.", finite_above(0)
    )
    # The regressor and LEO.
    hidden_units: int = option(
        40, "Units in each of the regressor's 2 hidden layers.", at_least(1)
    )
    num_latents: int = shared("num_latents", 16)
    inner_unroll_length: int = shared("inner_unroll_length", 5)
    finetuning_unroll_length: int = shared("finetuning_unroll_length", 0)
    inner_lr_init: float = shared("inner_lr_init", 0.1)
    finetuning_lr_init: float = shared("finetuning_lr_init", 0.001)
    inner_gradient_norm_threshold: float = option(
        10.0,
        "Clip each task's gradient norm in both models' inner loops (0: off).",
        finite_at_least(0),
    )
    kl_weight: float = shared("kl_weight", 0.01)
    encoder_penalty_weight: float = shared("encoder_penalty_weight", 1e-6)
    l2_penalty_weight: float = shared("l2_penalty_weight", 1e-8)
    orthogonality_penalty_weight: float = shared("orthogonality_penalty_weight", 1e-3)
    # The baseline.
    maml_inner_lr: float = option(
        0.01, "MAML's (fixed) adaptation learning rate.", finite_at_least(0)
    )
    maml_inner_steps: int = option(5, "MAML's adaptation steps.", at_least(0))
    # Meta-training (both models, on the same tasks).
    metatrain_batch_size: int = shared("metatrain_batch_size", 16)
    num_steps_limit: int = option(3000, "Meta-training steps.", at_least(1))
    outer_lr: float = shared("outer_lr", 1e-3)
    gradient_threshold: float = shared("gradient_threshold", 0.1)
    gradient_norm_threshold: float = shared("gradient_norm_threshold", 0.1)
    checkpoint_steps: int = option(
        500, "Steps between checkpoints and figures.", at_least(1)
    )
    summary_steps: int = option(100, "Steps between TensorBoard scalars.", at_least(1))
    # Evaluation.
    num_eval_tasks: int = option(
        1000,
        "Held-out tasks of the final evaluation; at least 2, for a 95% interval.",
        at_least(2),
    )
    num_eval_query_points: int = option(
        100, "Query points per held-out task.", at_least(1)
    )
    num_prediction_samples: int = option(
        10,
        "Sampled LEO adaptations per task for the NLL and the figure.",
        at_least(1),
    )
    num_figure_tasks: int = option(5, "Held-out tasks in the figure.", at_least(1))

    RULES: ClassVar[tuple] = (figure_tasks_in_first_eval_batch,)

    def to_dict(self):
        return dataclasses.asdict(self)


# What the checkpoint's variables, and the adaptations they were meta-learned
# for, depend on: evaluating with other values is refused. The task (K, the
# noise) and the seed may differ; the results record the trained ones.
FIXED_FOR_EVALUATION = (
    "hidden_units",
    "num_latents",
    "inner_unroll_length",
    "finetuning_unroll_length",
    "maml_inner_steps",
    "maml_inner_lr",
)
# The task a run trains on, recorded beside the evaluated one.
TASK_FIELDS = ("num_shots", "noise_stddev", "seed")
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


def eval_batch_size(config):
    """Held-out tasks per evaluation batch."""
    return min(config.num_eval_tasks, _EVAL_BATCH_LIMIT)
