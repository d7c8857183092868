"""Cosine nearest-class-mean (NCM) few-shot accuracy of an embedding pickle.

Reads the pickle with NumPy alone; the classifier is leo_tf's
(`leo_tf/baseline.py`). For each N-way K-shot episode: draw N distinct
classes, K support and all remaining examples of each class as queries;
embeddings are L2-normalised, a class's prototype is the mean of its K
normalised support embeddings, and each query goes to the prototype of
highest cosine similarity. Prints the mean accuracy over episodes and its
95% interval (1.96 * std / sqrt(episodes)).

Usage:
    python benchmarks/ncm_baseline.py PICKLE [--episodes 10000] [--seed 0]
            [--settings 5x1,5x5,20x1,20x5]
"""

import argparse
import collections
import pickle

import numpy as np

from leo_tf import baseline


def load_classes(path):
    """{class id: float32 [n_c, D]} from a pickle with embeddings and keys."""
    with open(path, "rb") as file:
        data = pickle.load(file, encoding="latin1")
    embeddings = np.asarray(data["embeddings"], np.float32)
    rows = collections.defaultdict(list)
    for row, key in enumerate(data["keys"]):
        rows[str(key).split("-")[1]].append(row)
    return {c: embeddings[r] for c, r in sorted(rows.items())}


def normalise(x):
    """Rows of x [..., D] scaled to unit L2 norm."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def episode_accuracy(classes, num_ways, num_shots, rng):
    """Accuracy of cosine NCM on one episode.

    Args:
      classes: list of float32 [n_c, D] (already L2-normalised).
      num_ways, num_shots: N and K.
      rng: numpy Generator.
    """
    chosen = rng.choice(len(classes), num_ways, replace=False)
    support, queries, labels = [], [], []
    for label, c in enumerate(chosen):
        examples = classes[c][rng.permutation(len(classes[c]))]
        support.append(examples[:num_shots])
        queries.append(examples[num_shots:])
        labels.append(np.full(len(examples) - num_shots, label))
    predictions = baseline.nearest_class_mean_predictions(
        np.stack(support), np.concatenate(queries)
    )  # [M]
    return float(np.mean(predictions == np.concatenate(labels)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pickle")
    parser.add_argument("--episodes", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--settings", default="5x1,5x5,20x1,20x5", help="comma-separated <ways>x<shots>"
    )
    args = parser.parse_args()
    classes = [normalise(x) for x in load_classes(args.pickle).values()]
    counts = sorted({len(x) for x in classes})
    print(
        f"{args.pickle}: {len(classes)} classes, {counts[0]}-{counts[-1]} "
        f"examples per class, D = {classes[0].shape[1]}"
    )
    for setting in args.settings.split(","):
        ways, shots = (int(v) for v in setting.split("x"))
        rng = np.random.default_rng(args.seed)
        accuracies = np.array(
            [episode_accuracy(classes, ways, shots, rng) for _ in range(args.episodes)]
        )
        ci95 = 1.96 * accuracies.std() / np.sqrt(len(accuracies))
        print(
            f"{ways}-way {shots}-shot: {100 * accuracies.mean():.2f} +- "
            f"{100 * ci95:.2f} % ({args.episodes} episodes; queries: all "
            "remaining examples of each class)"
        )


if __name__ == "__main__":
    main()
