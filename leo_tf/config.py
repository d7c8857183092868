"""Typed configuration of LEO runs.

The dataclasses here are what every other module takes; only this module
reads absl flags.
"""

import dataclasses


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
