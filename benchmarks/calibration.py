"""Does averaging S sampled adaptations beat LEO's deterministic answer?

Serves meta-test episodes of a data set to an exported LEO (see
`python -m leo_tf.export`) through its `serving_default` signature (one
adaptation with the Gaussians' means) and its `sampled` signature (S
adaptations with sampled latents and weights, probabilities averaged), and
prints, for each, accuracy with its 95% interval, the mean negative
log-likelihood of the true class and the expected calibration error (15
bins) over all query examples.

    python benchmarks/calibration.py --export_dir=exports/leo \
        --data_path=DIR --dataset_name=omniglot --num_classes=5 \
        --num_tr_examples_per_class=1 --num_episodes=2000 --num_samples=1,10,30

The episodes are the meta-test episodes `leo_tf.train --evaluation_mode`
would draw with the same --seed (its first --num_episodes).
"""

import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from leo_tf import baseline, uncertainty
from leo_tf.config import DataConfig
from leo_tf.data import meta_dataset

flags.DEFINE_string("export_dir", None, "The SavedModel to measure.")
flags.DEFINE_string("data_path", None, "Directory holding the data set.")
flags.DEFINE_string("dataset_name", "synthetic", "Data set under --data_path.")
flags.DEFINE_integer("num_classes", 5, "N of the episodes.")
flags.DEFINE_integer("num_tr_examples_per_class", 1, "K of the episodes.")
flags.DEFINE_integer("num_episodes", 2000, "Meta-test episodes to serve.")
flags.DEFINE_list("num_samples", ["1", "10", "30"], "Values of S to measure.")
flags.DEFINE_integer("seed", 0, "Seed of the episodes and the samples.")
FLAGS = flags.FLAGS

_BATCH = 100  # episodes sampled at a time


def _episodes():
    """Yields (support [N, K, D], query [M, D], labels [M]) per episode."""
    data = DataConfig(
        data_path=FLAGS.data_path,
        dataset_name=FLAGS.dataset_name,
        num_classes=FLAGS.num_classes,
        num_tr_examples_per_class=FLAGS.num_tr_examples_per_class,
        metatest_batch_size=_BATCH,
    )
    classes = meta_dataset.load_classes(data, "test")
    sampler = meta_dataset.eval_sampler(data, classes, "test", FLAGS.seed)
    served = 0
    for step in range(-(-FLAGS.num_episodes // _BATCH)):
        batch = sampler.sample(step)
        for b in range(min(_BATCH, FLAGS.num_episodes - served)):
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
    per_episode = [part.mean() for part in np.split(correct, np.cumsum(episode_sizes))[:-1]]
    accuracy, ci95 = baseline.mean_and_ci95(per_episode)
    true_class = probabilities[np.arange(labels.size), labels]
    nll = float(-np.log(np.maximum(true_class, 1e-12)).mean())
    ece = uncertainty.expected_calibration_error(probabilities, labels)
    print(
        f"{name:>16}  accuracy {100 * accuracy:6.2f} +- {100 * ci95:.2f}  "
        f"NLL {nll:.4f}  ECE {100 * ece:5.2f}%  ({seconds:.0f} s)",
        flush=True,
    )


def main(argv):
    del argv
    if not FLAGS.export_dir or not FLAGS.data_path:
        sys.exit("calibration: --export_dir and --data_path are required")
    loaded = tf.saved_model.load(FLAGS.export_dir)
    deterministic = loaded.signatures["serving_default"]
    sampled = loaded.signatures["sampled"]
    sample_counts = [int(s) for s in FLAGS.num_samples]
    results = {"deterministic": []} | {s: [] for s in sample_counts}
    seconds = dict.fromkeys(results, 0.0)
    labels, sizes = [], []
    for index, (support, query, query_labels) in enumerate(_episodes()):
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
                seed=tf.constant(FLAGS.seed * 1_000_003 + index, tf.int64),
            )
            results[count].append(output["mean_probabilities"].numpy())
            seconds[count] += time.perf_counter() - start
        labels.append(query_labels)
        sizes.append(query_labels.size)
    labels = np.concatenate(labels)
    print(
        f"{FLAGS.dataset_name} {FLAGS.num_classes}-way "
        f"{FLAGS.num_tr_examples_per_class}-shot, {len(sizes)} meta-test "
        f"episodes, {labels.size} queries"
    )
    for key, probabilities in results.items():
        name = key if key == "deterministic" else f"sampled S={key}"
        _scores(name, np.concatenate(probabilities), labels, sizes, seconds[key])


if __name__ == "__main__":
    app.run(main)
