"""Will a regression run fit? Its largest tensors, before TensorFlow runs them.

`check_run` refuses, with a ConfigError naming the flags to lower, a run in
which a tensor would have more elements than TensorFlow's int32 indexing
allows, or whose estimated peak memory exceeds what the process may use
(leo_tf.memory.check_tensors_fit). The estimate is a rough upper bound from
the tensors that grow with the flags, each counted as often as it is alive
at once (float32, 4 bytes an element), plus 1 GiB for the interpreter,
TensorFlow and the compiled steps; the paper's settings need far less than
any machine has, so it matters only for sizes far beyond them.

Shapes use B tasks, P regressor parameters (leo_tf.regression.mlp), H
hidden units, L latents, K support and Q query points, A adaptation steps
(the latent-space and finetuning steps, plus the first decode), M MAML
steps and S sampled adaptations.
"""

from leo_tf import memory
from leo_tf.regression import config as config_lib
from leo_tf.regression import mlp

# Copies alive at once: the forward value, its gradient, and the first-order
# gradient's terms kept for the second-order one. Measured (BUILD.md): the
# training part of a run's peak is 0.5-0.8 of this estimate.
_ACTIVATION_COPIES = 6
# The decoder's kernel, its gradient, Adam's two slots, the clipped gradient
# and LEO's encoder kernels of the same order.
_WEIGHT_COPIES = 12


_DEFAULTS = config_lib.RegressionConfig()


def _flags(config, *names):
    """("name=value", ...) of the flags that size a tensor, the one furthest
    above its default first (the one an error names)."""
    grown = sorted(
        names, key=lambda n: -getattr(config, n) / max(getattr(_DEFAULTS, n), 1)
    )
    return tuple(f"{name}={getattr(config, name)}" for name in grown)


def run_tensors(config):
    """[memory.Tensor] of a regression run: meta-training (unless only
    evaluating) and the held-out evaluation."""
    p = mlp.num_parameters(config.hidden_units)
    h = config.hidden_units
    adaptations = config.inner_unroll_length + config.finetuning_unroll_length + 1
    # Both models' per-task parameters at every step: LEO's and MAML's.
    parameter_sets = adaptations + config.maml_inner_steps + 1
    tensors = [
        memory.Tensor(
            "decoder kernel",
            (config.num_latents, 2 * p),
            _WEIGHT_COPIES,
            _flags(config, "hidden_units", "num_latents"),
        )
    ]
    if not config.evaluation_mode:
        b = config.metatrain_batch_size
        points, points_flag = max(
            (config.num_shots, "num_shots"),
            (config.num_query_points, "num_query_points"),
        )
        tensors += [
            memory.Tensor(
                "per-task parameters of a meta-training batch [A + M + 1, B, P]",
                (parameter_sets, b, p),
                _ACTIVATION_COPIES,
                _flags(config, "metatrain_batch_size", "hidden_units"),
            ),
            memory.Tensor(
                "regressor activations of a meta-training batch [A, B, K or Q, H]",
                (adaptations, b, points, h),
                _ACTIVATION_COPIES,
                _flags(config, points_flag, "metatrain_batch_size", "hidden_units"),
            ),
        ]
    sampled = config.num_prediction_samples * config_lib.eval_batch_size(config)
    tensors += [
        memory.Tensor(
            "sampled parameters of an evaluation batch [S B, P]",
            (sampled, p),
            _ACTIVATION_COPIES,
            _flags(config, "num_prediction_samples", "hidden_units"),
        ),
        memory.Tensor(
            "regressor activations of an evaluation batch [S B, Q, H]",
            (sampled, config.num_eval_query_points, h),
            _ACTIVATION_COPIES,
            _flags(
                config,
                "num_eval_query_points",
                "num_prediction_samples",
                "hidden_units",
            ),
        ),
        memory.Tensor(
            "regressor activations of an evaluation batch's support sets [S B, K, H]",
            (sampled, config.num_shots, h),
            _ACTIVATION_COPIES,
            _flags(config, "num_shots", "num_prediction_samples", "hidden_units"),
        ),
    ]
    return tensors


def check_run(config, available=None):
    """ConfigError if the run's tensors overflow int32 or it needs more memory
    than `available` ((bytes, source); default memory.available_memory())."""
    tensors = run_tensors(config)
    needed = memory.estimated_peak_bytes(tensors, data_bytes=0)
    memory.check_tensors_fit(tensors, needed, available)
