"""Repeats the gradient of a two-tower meta-batch; prints what changed.

Run as `python -m tests.tower_gradient_repeats CALLS` in a fresh process:
the towers run side by side only with leo_tf's thread settings (one
inter-op thread per core, `runtime.configure_threads`), which TensorFlow
takes before its first op, so not inside a test process that already ran
some. Prints a JSON object: for each variable whose gradient differed from
the first call's in any later call, in how many calls.
"""

import json
import sys

# leo_tf before TensorFlow, as users import it: it chooses the CPU kernels.
from leo_tf import runtime, steps
from leo_tf.config import ModelConfig
from leo_tf.model import LEO
from tests import model_fixtures as fx

import numpy as np
import tensorflow as tf


def main(calls):
    runtime.configure_threads()
    # Omniglot 20-way 5-shot shapes (D = 64): 100 support examples, so
    # 10^4 relation-network pairs per episode.
    model = LEO(ModelConfig(dropout_rate=0.3), 64, seed=0)
    episodes = fx.random_episodes(0, batch=12, classes=20, shots=5, queries=15, dim=64)
    noise = fx.noise_for(episodes, model.config)

    # The towers as the compiled step runs them on this host.
    @tf.function
    def gradients():
        with steps.host_products(model):
            return steps._scaled_gradients(model, episodes, noise, 1.0, 2)[0]

    first = [g.numpy() for g in gradients()]
    changed = {}
    for _ in range(calls):
        for variable, expected, actual in zip(
            model.trainable_variables, first, gradients()
        ):
            if not np.array_equal(actual.numpy(), expected):
                changed[variable.path] = changed.get(variable.path, 0) + 1
    print(json.dumps(changed))


if __name__ == "__main__":
    main(int(sys.argv[1]))
