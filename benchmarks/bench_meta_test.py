"""Time and peak memory of a meta-test, end to end and step alone.

    python benchmarks/bench_meta_test.py [--episodes 10000] [--variants new,old]

Random data shaped like miniImageNet's test split (20 classes x 600 x 640),
200 x 5-way 1-shot episodes per batch with V=599, an untrained model (the
arithmetic does not depend on the weights). Each variant runs in a fresh
process, whose peak resident memory is reported:

  new   leo_tf's loop, `meta_eval.MetaEvaluator.evaluate`, with the
        nearest-class-mean baseline;
  old   the loop it replaced: batches materialised by
        `episodes.make_dataset` (query set [B, N, V, D], 1.5 GB), the
        compiled `model.run_episodes`, and `baseline.py` in NumPy.

"step alone" repeats one batch's compiled step (new: adaptation, grouped
query logits and baseline; old: `run_episodes` only) as many times as
there are batches; "end to end" includes everything but tracing.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

SHAPE = dict(classes=20, examples=600, dim=640, way=5, shot=1, batch=200)


def _sampler(seed=0):
    from leo_tf.data import embeddings, episodes

    rng = np.random.default_rng(seed)
    classes = embeddings.ClassEmbeddings(
        source="random",
        embeddings={
            f"c{c:02d}": rng.standard_normal(
                (SHAPE["examples"], SHAPE["dim"]), dtype=np.float32
            )
            for c in range(SHAPE["classes"])
        },
    )
    return episodes.EpisodeSampler(
        classes,
        num_classes=SHAPE["way"],
        num_tr_examples_per_class=SHAPE["shot"],
        num_val_examples_per_class=SHAPE["examples"] - SHAPE["shot"],
        batch_size=SHAPE["batch"],
        seed=seed,
    )


def _timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def worker(variant, num_batches):
    from leo_tf import runtime

    import tensorflow as tf

    runtime.configure_threads()
    from leo_tf import baseline, meta_eval, steps
    from leo_tf.config import ModelConfig
    from leo_tf.data import episodes as episodes_lib
    from leo_tf.model import LEO

    sampler = _sampler()
    model = LEO(ModelConfig(), SHAPE["dim"], seed=0)
    towers = runtime.num_towers(0, SHAPE["batch"])
    if variant == "new":
        evaluator = meta_eval.MetaEvaluator(model, sampler, num_towers=towers)
        evaluator.evaluate(num_batches, 1)  # traces
        results, total = _timed(lambda: evaluator.evaluate(0, num_batches))
        inputs = [tf.constant(x) for x in evaluator.batch_inputs(0)]

        def repeat_step():
            for _ in range(num_batches):
                outputs = evaluator._step(*inputs)  # pylint: disable=protected-access
            outputs[0].numpy()

        accuracy = results.accuracy.mean()
        baseline_accuracy = results.baseline_accuracy.mean()
    else:

        def evaluate(episodes):
            with steps.host_products(model):
                parts = steps.run_towers(model, episodes, None, towers)
            return tf.concat([part.accuracy for part in parts], 0)

        step = tf.function(evaluate, input_signature=[sampler.element_spec])

        def loop():
            accuracies, baselines = [], []
            dataset = episodes_lib.make_dataset(sampler, 0, num_batches, prefetch=1)
            for _, episodes in dataset:
                accuracies.append(step(episodes).numpy())
                baselines.append(
                    baseline.nearest_class_mean_accuracy(
                        episodes.tr_input, episodes.val_input, episodes.val_output
                    )
                )
            return np.mean(accuracies), np.mean(baselines)

        _, episodes = next(iter(episodes_lib.make_dataset(sampler, 0, 1)))
        step(episodes)  # traces
        (accuracy, baseline_accuracy), total = _timed(loop)

        def repeat_step():
            for _ in range(num_batches):
                accuracy = step(episodes)
            accuracy.numpy()

    _, step_alone = _timed(repeat_step)
    return {
        "variant": variant,
        "episodes": num_batches * SHAPE["batch"],
        "end_to_end_s": total,
        "step_alone_s": step_alone,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "accuracy": float(accuracy),
        "baseline_accuracy": float(baseline_accuracy),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=10000)
    parser.add_argument("--variants", default="new,old")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    num_batches = max(1, args.episodes // SHAPE["batch"])
    if args.worker:
        print("@result " + json.dumps(worker(args.worker, num_batches)), flush=True)
        return
    results = []
    for variant in args.variants.split(","):
        process = subprocess.run(
            [
                sys.executable,
                __file__,
                f"--worker={variant}",
                f"--episodes={args.episodes}",
            ],
            capture_output=True,
            text=True,
        )
        if process.returncode:
            sys.exit(f"{variant} failed:\n{process.stderr[-3000:]}")
        output = process.stdout
        result = json.loads(output.split("@result ", 1)[1])
        results.append(result)
        print(
            f"{variant}: {result['episodes']} episodes end to end "
            f"{result['end_to_end_s']:.2f} s, step alone {result['step_alone_s']:.2f} s "
            f"(ratio {result['end_to_end_s'] / result['step_alone_s']:.2f}), "
            f"peak {result['peak_rss_mb']:.0f} MB; accuracy {result['accuracy']:.4f}, "
            f"baseline {result['baseline_accuracy']:.4f}",
            flush=True,
        )
    if len(results) == 2:
        print(
            f"old / new end to end: "
            f"{results[1]['end_to_end_s'] / results[0]['end_to_end_s']:.2f}x"
        )


if __name__ == "__main__":
    main()
