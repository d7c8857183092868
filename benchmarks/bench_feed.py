"""What a training step's inputs cost it: the step fed four ways, in one process.

    python benchmarks/bench_feed.py [--shots 1] [--rounds 6] [--steps 30]

One compiled meta-training step (12 x 5-way K-shot, V = 15, 640-d random
miniImageNet-shaped data, the shipped step with its default towers), fed

  episodes and noise   as `leo_tf.train` feeds it: episodes sampled by
                       `episodes.make_dataset`, noise drawn ahead by
                       `noise.noise_dataset`;
  episodes only        sampled episodes, one fixed noise;
  noise only           one fixed batch of episodes, drawn noise;
  neither              one fixed batch and noise: the step alone.

The four take turns window by window (rotating which goes first), so each
is timed under the same machine conditions. Prints, per feed, the median
over rounds of wall ms per step and of process CPU ms per step (all
threads: the step's and the input pipeline's).
"""

import argparse
import statistics
import sys
import time
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

# leo_tf before TensorFlow, as its users import it (it chooses the kernels).
from leo_tf import runtime, steps  # pylint: disable=wrong-import-position
from leo_tf.config import (  # pylint: disable=wrong-import-position
    ModelConfig,
    OptimizerConfig,
)
from leo_tf.data import episodes as episodes_lib  # pylint: disable=C0413
from leo_tf.model import LEO  # pylint: disable=wrong-import-position
from leo_tf.noise import noise_dataset  # pylint: disable=wrong-import-position

import bench_step  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

FEEDS = ("episodes and noise", "episodes only", "noise only", "neither")


def _feeders(sampler, model_config):
    """feed name -> a function returning the next (episodes, noise)."""
    spec = sampler.element_spec
    count = 10**9

    def episode_stream():
        return episodes_lib.make_dataset(sampler, 0, count)

    def noise_stream():
        return noise_dataset(
            0,
            0,
            count,
            spec.tr_input.shape.as_list(),
            spec.val_input.shape.as_list(),
            model_config,
        )

    (_, fixed_episodes), fixed_noise = next(
        iter(tf.data.Dataset.zip(episode_stream(), noise_stream()))
    )
    both = iter(tf.data.Dataset.zip(episode_stream(), noise_stream()))
    episodes_alone, noise_alone = iter(episode_stream()), iter(noise_stream())

    def from_both():
        (_, episodes), noise = next(both)
        return episodes, noise

    return {
        "episodes and noise": from_both,
        "episodes only": lambda: (next(episodes_alone)[1], fixed_noise),
        "noise only": lambda: (fixed_episodes, next(noise_alone)),
        "neither": lambda: (fixed_episodes, fixed_noise),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30, help="steps per window")
    args = parser.parse_args()

    runtime.configure_threads()
    setting = dict(mode="train", batch=12, shots=args.shots, queries=15)
    sampler = bench_step._sampler(setting)  # pylint: disable=protected-access
    model_config = ModelConfig(dropout_rate=0.3)
    model = LEO(model_config, bench_step.DIM, seed=0)
    optimizer = steps.make_optimizer(OptimizerConfig())
    step = steps.compile_train_step(
        model,
        optimizer,
        OptimizerConfig(),
        sampler.element_spec,
        num_towers=runtime.num_towers(0, setting["batch"]),
    )
    feeders = _feeders(sampler, model_config)

    def run(feed, count):
        for _ in range(count):
            metrics = step(*feeders[feed]())
        metrics.loss.numpy()

    for feed in FEEDS:  # tracing, XLA compilation, warm pipelines
        run(feed, 10)
    wall = {feed: [] for feed in FEEDS}
    cpu = {feed: [] for feed in FEEDS}
    for index in range(args.rounds):
        for feed in FEEDS[index % 4 :] + FEEDS[: index % 4]:
            run(feed, 3)  # its pipeline back in its steady state
            started, cpu_started = time.perf_counter(), time.process_time()
            run(feed, args.steps)
            wall[feed].append((time.perf_counter() - started) / args.steps * 1e3)
            cpu[feed].append((time.process_time() - cpu_started) / args.steps * 1e3)
    print(f"12 x 5-way {args.shots}-shot training step, medians of {args.rounds}")
    for feed in FEEDS:
        print(
            f"  {feed:<20} {statistics.median(wall[feed]):7.2f} ms per step, "
            f"{statistics.median(cpu[feed]):7.2f} ms of CPU",
            flush=True,
        )


if __name__ == "__main__":
    main()
