"""Sampling speed: meta-batches and step noise per second, sampler and tf.data.

    python benchmarks/bench_sampling.py [--windows=7] [--window_seconds=1.0]

Data: miniImageNet-shaped, generated in memory (64 classes x 600 examples x
640 float32). Prints the median over timed windows (after a warm-up) of:

* `EpisodeSampler.sample`, training batch: 12 x 5-way 1-shot, V = 15;
* `EpisodeSampler.sample`, evaluation batch: 200 x 5-way 1-shot, V = 599
  (1.5 GB per batch);
* `make_dataset` iterated eagerly, training batch;
* `make_dataset` with a consumer that spends 12 ms per step (sleeping, so
  the GIL is free, as during a compiled training step): the overhead the
  pipeline adds to each step (it does not prefetch: its indices come from
  Python, which runs only inside the consumer's request);
* `noise.noise_dataset`, the random numbers of the training steps as the
  trainer draws them (12 x 5-way 1-shot and 5-shot, V = 15, S = F = 5,
  L = 64, dropout 0.3): steps/s and process CPU time per step.

The requirement: sampling at least 10x faster than a ~12 ms training step
consumes, i.e. at least 833 training meta-batches/s.
"""

import os
import statistics
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from leo_tf import noise  # pylint: disable=wrong-import-position
from leo_tf.data import embeddings  # pylint: disable=wrong-import-position
from leo_tf.data import episodes  # pylint: disable=wrong-import-position

_WINDOWS = flags.DEFINE_integer("windows", 7, "Timed windows per figure.")
_WINDOW_SECONDS = flags.DEFINE_float(
    "window_seconds", 1.0, "Minimum length of a timed window."
)
_STEP_MS = 12.0


def rate(fn, windows, window_seconds, min_calls=1):
    """Median calls/s of `fn` over `windows` windows of >= `window_seconds`."""
    fn()  # warm-up
    rates = []
    for _ in range(windows):
        calls = 0
        start = time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= window_seconds and calls >= min_calls:
                break
        rates.append(calls / elapsed)
    return statistics.median(rates), min(rates), max(rates)


def report(name, rates, unit_bytes=None):
    median, low, high = rates
    line = (
        f"{name:<58} {median:9.1f} batches/s  ({1e3 / median:8.3f} ms; "
        f"windows {low:.1f}..{high:.1f})"
    )
    if unit_bytes:
        line += f"  {median * unit_bytes / 1e9:.2f} GB/s"
    print(line, flush=True)


def five_way_one_shot(classes, num_val_examples, batch_size):
    """An EpisodeSampler of 5-way 1-shot episodes of `classes`, seed 0."""
    return episodes.EpisodeSampler(
        classes,
        num_classes=5,
        num_tr_examples_per_class=1,
        num_val_examples_per_class=num_val_examples,
        batch_size=batch_size,
        seed=0,
    )


def report_noise(num_shots, windows, window_seconds):
    """Prints steps/s and CPU ms per step of `noise.noise_dataset`."""
    # pylint: disable=import-outside-toplevel
    from leo_tf.config import ModelConfig

    dataset = noise.noise_dataset(
        0,
        0,
        10**9,
        [12, 5, num_shots, 640],
        [12, 5, 15, 640],
        ModelConfig(dropout_rate=0.3),
    )
    iterator = iter(dataset)
    for _ in range(10):  # tracing, XLA compilation, the prefetch buffer
        next(iterator)
    drawn, cpu_before = 0, time.process_time()

    def one_step():
        nonlocal drawn
        next(iterator)
        drawn += 1

    result = rate(one_step, windows, window_seconds)
    cpu_ms = (time.process_time() - cpu_before) * 1e3 / drawn
    report(f"noise_dataset, train 12 x 5-way {num_shots}-shot", result)
    print(f"{'':<58} {cpu_ms:9.3f} ms of CPU per step's noise", flush=True)


def main(argv):
    del argv
    windows, seconds = _WINDOWS.value, _WINDOW_SECONDS.value
    rng = np.random.default_rng(0)
    classes = embeddings.ClassEmbeddings(
        source="in-memory 64 x 600 x 640",
        embeddings={
            f"s{c:07d}": rng.standard_normal((600, 640), dtype=np.float32)
            for c in range(64)
        },
    )
    print(
        f"data: {classes.source}; {os.cpu_count()} CPUs; load average "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )

    train = five_way_one_shot(classes, num_val_examples=15, batch_size=12)
    evaluation = five_way_one_shot(classes, num_val_examples=599, batch_size=200)

    step = iter(range(10**9))
    train_rate = rate(lambda: train.sample(next(step)), windows, seconds)
    report("sampler, train 12 x 5-way 1-shot, V=15", train_rate)
    eval_bytes = 200 * 5 * 600 * 640 * 4
    report(
        "sampler, eval 200 x 5-way 1-shot, V=599",
        rate(
            lambda: evaluation.sample(next(step)),
            windows,
            max(seconds, 2.0),
            min_calls=3,
        ),
        eval_bytes,
    )

    iterator = iter(episodes.make_dataset(train, first_step=0))
    report(
        "tf.data make_dataset, train batch, eager next()",
        rate(lambda: next(iterator), windows, seconds),
    )

    def consume_one_step():
        next(iterator)
        time.sleep(_STEP_MS / 1e3)

    median, low, high = rate(consume_one_step, windows, seconds)
    overhead_ms = 1e3 / median - _STEP_MS
    print(
        f"{'tf.data make_dataset, train batch, 12 ms consumer':<58} "
        f"{median:9.1f} steps/s    (pipeline adds {overhead_ms:.3f} ms "
        "per step, including sleep overshoot)",
        flush=True,
    )

    for num_shots in (1, 5):
        report_noise(num_shots, windows, seconds)

    required = 10 * 1e3 / _STEP_MS
    verdict = "meets" if train_rate[0] >= required else "MISSES"
    print(
        f"training sampler {train_rate[0]:.0f} batches/s {verdict} the "
        f">= {required:.0f} batches/s requirement (10x a {_STEP_MS:g} ms "
        "step)",
        flush=True,
    )


if __name__ == "__main__":
    app.run(main)
