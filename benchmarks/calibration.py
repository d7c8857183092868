"""Whether averaging S sampled adaptations beats LEO's deterministic answer.

Serves meta-test episodes of a data set to an exported LEO (see
`python -m leo_tf.export`) through its `serving_default` signature (one
adaptation with the Gaussians' means) and its `sampled` signature (S
adaptations with sampled latents and weights, probabilities averaged), and
prints, for each, accuracy with its 95% interval, the mean confidence (top
probability), the mean negative log-likelihood of the true class and the
expected calibration error (15 bins) over all query examples.

    python benchmarks/calibration.py exports/leo --data_path=DIR \
        --dataset_name=omniglot --num_classes=5 --num_tr_examples_per_class=1 \
        --num_episodes=2000 --num_samples=1,10,30

The episodes are the meta-test episodes `leo_tf.train --evaluation_mode`
would draw with the same --seed (its first --num_episodes); from `leo_tf`
come the data reader, the sampler, the nearest-class-mean baseline and the
uncertainty summaries.
"""

import argparse
import time

import numpy as np
import tensorflow as tf

from leo_tf import baseline, uncertainty
from leo_tf.config import DataConfig
from leo_tf.data import meta_dataset


def _episodes(args):
    """Yields (support [N, K, D], query [M, D], labels [M]) per episode."""
    data = DataConfig(
        data_path=args.data_path,
        dataset_name=args.dataset_name,
        num_classes=args.num_classes,
        num_tr_examples_per_class=args.num_tr_examples_per_class,
    )
    classes = meta_dataset.load_classes(data, "test")
    # The default --metatest_batch_size, as --evaluation_mode's: the
    # episodes depend on the batch size.
    sampler = meta_dataset.eval_sampler(data, classes, "test", args.seed)
    size = sampler.batch_size
    served = 0
    for step in range(-(-args.num_episodes // size)):
        batch = sampler.sample(step)
        for b in range(min(size, args.num_episodes - served)):
            query = batch.val_input[b]  # [N, V, D]
            yield (
                batch.tr_input[b],
                query.reshape(-1, query.shape[-1]),
                batch.val_output[b].reshape(-1),
            )
            served += 1


def _scores(name, probabilities, labels, episode_sizes, seconds):
    """One printed row of figures for per-query probabilities [Q, N]."""
    correct = probabilities.argmax(-1) == labels
    per_episode = [
        part.mean() for part in np.split(correct, np.cumsum(episode_sizes))[:-1]
    ]
    accuracy, ci95 = baseline.mean_and_ci95(per_episode)
    true_class = probabilities[np.arange(labels.size), labels]
    nll = float(-np.log(np.maximum(true_class, 1e-12)).mean())
    ece = uncertainty.expected_calibration_error(probabilities, labels)
    confidence = probabilities.max(-1).mean()
    print(
        f"{name:>16}  accuracy {100 * accuracy:6.2f} +- {100 * ci95:.2f}  "
        f"mean confidence {100 * confidence:6.2f}  NLL {nll:.4f}  "
        f"ECE {100 * ece:5.2f}%  ({seconds:.0f} s)",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir", help="the SavedModel to measure")
    parser.add_argument("--data_path", required=True, help="holds the data set")
    parser.add_argument("--dataset_name", default="synthetic")
    parser.add_argument("--num_classes", type=int, default=5, help="N")
    parser.add_argument("--num_tr_examples_per_class", type=int, default=1, help="K")
    parser.add_argument("--num_episodes", type=int, default=2000)
    parser.add_argument("--num_samples", default="1,10,30", help="values of S")
    parser.add_argument("--seed", type=int, default=0, help="episodes and samples")
    args = parser.parse_args()
    loaded = tf.saved_model.load(args.export_dir)
    deterministic = loaded.signatures["serving_default"]
    sampled = loaded.signatures["sampled"]
    sample_counts = [int(s) for s in args.num_samples.split(",")]
    results = {"deterministic": []} | {s: [] for s in sample_counts}
    seconds = dict.fromkeys(results, 0.0)
    labels, sizes = [], []
    for index, (support, query, query_labels) in enumerate(_episodes(args)):
        support, query = tf.constant(support), tf.constant(query)
        start = time.perf_counter()
        results["deterministic"].append(
            deterministic(support=support, query=query)["probabilities"].numpy()
        )
        seconds["deterministic"] += time.perf_counter() - start
        for count in sample_counts:
            start = time.perf_counter()
            output = sampled(
                support=support,
                query=query,
                num_samples=tf.constant(count, tf.int32),
                seed=tf.constant(args.seed * 1_000_003 + index, tf.int64),
            )
            results[count].append(output["mean_probabilities"].numpy())
            seconds[count] += time.perf_counter() - start
        labels.append(query_labels)
        sizes.append(query_labels.size)
    labels = np.concatenate(labels)
    print(
        f"{args.dataset_name} {args.num_classes}-way "
        f"{args.num_tr_examples_per_class}-shot, {len(sizes)} meta-test "
        f"episodes, {labels.size} queries"
    )
    for key, probabilities in results.items():
        name = key if key == "deterministic" else f"sampled S={key}"
        _scores(name, np.concatenate(probabilities), labels, sizes, seconds[key])


if __name__ == "__main__":
    main()
