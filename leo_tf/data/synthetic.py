"""The built-in default data set: synthetic embeddings in LEO's pickle format.

`write_synthetic` writes `<data_path>/synthetic/center/{split}_embeddings.pkl`
laid out exactly as the published miniImageNet archive (see
`leo_tf.data.embeddings`): 64 / 16 / 20 train / val / test classes of 100
examples each, D = 640, float32, keys
`"synthetic-<class_id>-<class_id>_<index>.png"` with WordNet-style class ids
`s0000000` ... `s0000099` (disjoint across splits). Writing takes about
0.3 s (up to ~1 s on a busy 2-core machine); the three files hold 26 MB.

Generative model (every draw from one `np.random.default_rng(seed)`):

    U      [640, 32]  orthonormal basis of a random "signal" subspace
    S      [16, 640]  orthonormal "style" directions, orthogonal to U
    mu_c   ~ N(0, 1.0^2 I_32), drawn afresh for every class
    x      = U (mu_c + 0.8 e)  +  0.5 (g - U U^T g)  +  3.0 S^T a
           with e ~ N(0, I_32), g ~ N(0, I_640), a ~ N(0, I_16) per example.

Class identity lives only in the 32-dimensional subspace U (random, so not
axis-aligned). Most of each vector's energy is nuisance: isotropic noise in
the 608 other dimensions and, above all, per-example weights on 16 shared
high-variance style directions. A cosine nearest-class-mean classifier on
the raw (L2-normalised) embeddings is therefore weak, while a linear
projection learned on the 64 train classes (Fisher LDA) recovers the signal
on the unseen test classes: class means are independent across classes, so
that projection is all there is to learn, and it transfers to new classes.
It is the kind of map LEO's encoder and decoder can learn.

5-way test accuracy of cosine nearest-class-mean, seed 0, 2000 episodes
each with V = 100 - K queries per class, 95% intervals (`python -m
leo_tf.data.synthetic` prints these):

    raw embeddings                        1-shot 46.7 +- 0.2%   5-shot 76.2 +- 0.2%
    after LDA fitted on the train split   1-shot 98.5 +- 0.1%   5-shot 99.9 +- 0.0%
    after projecting onto U (oracle)      1-shot 99.5 +- 0.0%

(Intervals cover episode sampling only, not the draw of the 20 test classes.)
"""

import errno
import json
import os
import pathlib
import pickle
import shutil
import tempfile

import numpy as np

from leo_tf import baseline
from leo_tf.data import embeddings as embeddings_lib
from leo_tf.data import episodes as episodes_lib
from leo_tf.paths import default_data_path

DATASET_NAME = "synthetic"
EMBEDDING_CROP = "center"
NUM_CLASSES = {"train": 64, "val": 16, "test": 20}
EXAMPLES_PER_CLASS = 100
EMBEDDING_DIM = 640
SIGNAL_DIM = 32
NUM_STYLES = 16
CLASS_SCALE = 1.0
WITHIN_CLASS_SCALE = 0.8
NUISANCE_SCALE = 0.5
STYLE_SCALE = 3.0
# Written to <data_path>/synthetic/generator.json; bump when the data change.
GENERATOR_VERSION = 1
_METADATA_FILE = "generator.json"
# The three pickles' size on disk, in MB.
_SIZE_MB = 26


def _metadata(seed: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_classes": NUM_CLASSES,
        "examples_per_class": EXAMPLES_PER_CLASS,
        "embedding_dim": EMBEDDING_DIM,
        "signal_dim": SIGNAL_DIM,
        "num_styles": NUM_STYLES,
        "scales": {
            "class": CLASS_SCALE,
            "within_class": WITHIN_CLASS_SCALE,
            "nuisance": NUISANCE_SCALE,
            "style": STYLE_SCALE,
        },
    }


def _directions(rng: np.random.Generator):
    """Orthonormal signal basis float64 `[D, SIGNAL_DIM]` and style directions
    `[NUM_STYLES, D]`, orthogonal to each other: the columns of Q of a random
    Gaussian `[D, SIGNAL_DIM + NUM_STYLES]` matrix."""
    gaussian = rng.standard_normal((EMBEDDING_DIM, SIGNAL_DIM + NUM_STYLES))
    q, r = np.linalg.qr(gaussian)
    q *= np.sign(np.diag(r))  # a unique choice of signs
    return q[:, :SIGNAL_DIM], q[:, SIGNAL_DIM:].T


def signal_basis(seed: int = 0) -> np.ndarray:
    """float32 `[D, SIGNAL_DIM]`: an orthonormal basis of the class subspace.

    Projecting onto it is an oracle: all class information, no nuisance.
    """
    signal, _ = _directions(np.random.default_rng(seed))
    return signal.astype(np.float32)


def _split_examples(rng, signal, styles, num_classes):
    """float32 `[num_classes * EXAMPLES_PER_CLASS, D]`, class by class.

    Args:
      rng: the generator, advanced by the draws.
      signal: float64 `[D, SIGNAL_DIM]` orthonormal basis U.
      styles: float64 `[NUM_STYLES, D]` orthonormal, orthogonal to U.
      num_classes: C.
    """
    n = num_classes * EXAMPLES_PER_CLASS
    means = CLASS_SCALE * rng.standard_normal((num_classes, SIGNAL_DIM))
    codes = np.repeat(
        means, EXAMPLES_PER_CLASS, axis=0
    ) + WITHIN_CLASS_SCALE * rng.standard_normal((n, SIGNAL_DIM))
    # Isotropic noise in the complement of the signal subspace: g - U U^T g
    # with g ~ N(0, I_D) has the distribution of an N(0, I) vector in the
    # (D - SIGNAL_DIM)-dimensional complement, without a D x D rotation.
    noise = rng.standard_normal((n, EMBEDDING_DIM))
    noise -= (noise @ signal) @ signal.T
    style_weights = rng.standard_normal((n, NUM_STYLES))
    x = codes @ signal.T + NUISANCE_SCALE * noise + STYLE_SCALE * style_weights @ styles
    return x.astype(np.float32)


def write_synthetic(data_path, seed: int = 0) -> pathlib.Path:
    """Writes the synthetic data set under `data_path`, replacing files there.

    Args:
      data_path: the folder to hold `synthetic/center/*.pkl`.
      seed: the generator's seed; the same seed gives the same files.

    Returns:
      The data set's folder, `<data_path>/synthetic`.
    """
    rng = np.random.default_rng(seed)
    signal, styles = _directions(rng)
    dataset_dir = pathlib.Path(data_path) / DATASET_NAME
    crop_dir = dataset_dir / EMBEDDING_CROP
    crop_dir.mkdir(parents=True, exist_ok=True)
    first_class = 0
    for split in embeddings_lib.SPLITS:
        num_classes = NUM_CLASSES[split]
        class_ids = [f"s{first_class + c:07d}" for c in range(num_classes)]
        first_class += num_classes
        keys = [
            f"{DATASET_NAME}-{class_id}-{class_id}_{i:05d}.png"
            for class_id in class_ids
            for i in range(EXAMPLES_PER_CLASS)
        ]
        contents = {
            "embeddings": _split_examples(rng, signal, styles, num_classes),
            "keys": np.array(keys),
            "labels": np.repeat(np.arange(num_classes), EXAMPLES_PER_CLASS),
        }
        with open(crop_dir / f"{split}_embeddings.pkl", "wb") as f:
            pickle.dump(contents, f, protocol=4)
    with open(dataset_dir / _METADATA_FILE, "w", encoding="utf-8") as f:
        json.dump(_metadata(seed), f, indent=2, sort_keys=True)
    return dataset_dir


def _check_existing(dataset_dir: pathlib.Path, seed: int) -> None:
    """Raises DataError unless `dataset_dir` is a complete copy for `seed`."""
    metadata_path = dataset_dir / _METADATA_FILE
    expected = _metadata(seed)
    try:
        found = json.loads(metadata_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        found = f"unreadable ({e})"
    if found != expected:
        raise embeddings_lib.DataError(
            f"{metadata_path}: expected the synthetic data set written by "
            f"this version of leo_tf ({expected}), found {found}. Delete "
            f"{dataset_dir} to have it written again."
        )
    for split in embeddings_lib.SPLITS:
        path = embeddings_lib.split_path(
            dataset_dir.parent, DATASET_NAME, EMBEDDING_CROP, split
        )
        problem = embeddings_lib.not_a_file_problem(path)
        if problem:
            raise embeddings_lib.DataError(
                f"{path}: {problem}, in an existing synthetic data set. "
                f"Delete {dataset_dir} to have it written again."
            )


def ensure_synthetic(data_path, seed: int = 0) -> pathlib.Path:
    """Writes the synthetic data set under `data_path` unless it is there.

    Writing goes to a temporary folder that is renamed into place, so a
    reader never sees a partial data set, two processes racing here both
    end up using one complete copy, and a write that fails (disk full,
    read-only) leaves nothing behind: the next call writes it afresh.

    Args:
      data_path: the folder to hold `synthetic/`.
      seed: the generator's seed.

    Returns:
      The data set's folder, `<data_path>/synthetic`.

    Raises:
      DataError: `<data_path>/synthetic` exists but is not a complete copy
        written by this version with this seed, or it cannot be written
        (the message names --data_path and why).
    """
    data_path = pathlib.Path(data_path)
    dataset_dir = data_path / DATASET_NAME
    if not dataset_dir.exists():
        try:
            _write_into_place(data_path, dataset_dir, seed)
        except OSError as e:
            raise embeddings_lib.DataError(
                f"--data_path={data_path}: cannot write the synthetic data set "
                f"there: {_write_failure(data_path, e)}; nothing was written"
            ) from e
    _check_existing(dataset_dir, seed)
    return dataset_dir


def _write_into_place(data_path, dataset_dir, seed) -> None:
    """Writes the data set into a staging folder and renames it to
    `dataset_dir`; the staging folder is removed whatever happens."""
    data_path.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{DATASET_NAME}-", dir=data_path))
    try:
        write_synthetic(staging, seed=seed)
        try:
            os.rename(staging / DATASET_NAME, dataset_dir)
        except OSError:
            if not dataset_dir.exists():
                raise
            # Another process renamed its copy into place first.
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_failure(data_path: pathlib.Path, error: OSError) -> str:
    """Why writing under `data_path` failed, in words."""
    # Writing starts in the nearest folder that exists (mkdir, then mkdtemp).
    existing = next(p for p in (data_path, *data_path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{error.strerror} (the data set needs {_SIZE_MB} MB)"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{existing} is not writable ({error.strerror})"
    return str(error)


def fit_lda_projection(
    classes: embeddings_lib.ClassEmbeddings, num_components: int = SIGNAL_DIM
) -> np.ndarray:
    """Fisher LDA on L2-normalised examples: a linear map learned from `classes`.

    Args:
      classes: the examples to fit on (the train split).
      num_components: P, the directions kept; at most `num_classes - 1`.

    Returns:
      float32 `[D, P]`: the directions that best separate the class means
      relative to the within-class spread, scaled to unit within-class
      variance.
    """
    x = [
        episodes_lib.l2_normalize(a).astype(np.float64)
        for a in classes.embeddings.values()
    ]
    means = np.stack([a.mean(axis=0) for a in x])  # [C, D]
    centred = np.concatenate([a - m for a, m in zip(x, means)])  # [n, D]
    within = centred.T @ centred / len(centred)  # [D, D]
    within += 1e-6 * np.trace(within) / len(within) * np.eye(len(within))
    between_factor = (means - means.mean(axis=0)).T  # [D, C]
    # With within = L L^T, the LDA directions are L^-T y for the top
    # eigenvectors y of L^-1 between L^-T = A A^T / (C - 1), A = L^-1 F.
    # Those are A u / |A u| for the top eigenvectors u of the C x C matrix
    # A^T A, which is much cheaper than a D x D eigenproblem.
    cholesky = np.linalg.cholesky(within)
    a = np.linalg.solve(cholesky, between_factor)  # [D, C]
    _, u = np.linalg.eigh(a.T @ a)
    y = a @ u[:, ::-1][:, :num_components]
    y /= np.linalg.norm(y, axis=0)
    return np.linalg.solve(cholesky.T, y).astype(np.float32)  # [D, P]


def nearest_class_mean_accuracy(
    classes: embeddings_lib.ClassEmbeddings,
    *,
    num_classes: int = 5,
    num_tr_examples_per_class: int = 1,
    num_episodes: int = 1000,
    seed: int = 0,
    projection: np.ndarray | None = None,
    batch_size: int = 100,
):
    """Cosine nearest-class-mean accuracy on evaluation-style episodes.

    Each query is assigned the class whose mean support embedding has the
    highest cosine similarity with it. Episodes are those a meta-test would
    use: `EpisodeSampler` (which L2-normalises every example) with
    V = `eval_num_val_examples`.

    Args:
      classes: the split to evaluate on.
      num_classes: N.
      num_tr_examples_per_class: K.
      num_episodes: episodes to average over.
      seed: the sampler's seed.
      projection: optional float32 `[D, P]`, e.g. `fit_lda_projection`
        of the train split: examples are L2-normalised, projected, and
        the episodes drawn from the projected examples.
      batch_size: episodes sampled at a time.

    Returns:
      (mean accuracy, 95% interval half-width = 1.96 * std / sqrt(episodes)),
      both fractions.
    """
    if projection is not None:
        classes = embeddings_lib.ClassEmbeddings(
            source=classes.source,
            embeddings={
                c: episodes_lib.l2_normalize(a) @ projection
                for c, a in classes.embeddings.items()
            },
        )
    k = num_tr_examples_per_class
    batch_size = min(batch_size, num_episodes)
    sampler = episodes_lib.EpisodeSampler(
        classes,
        num_classes=num_classes,
        num_tr_examples_per_class=k,
        num_val_examples_per_class=episodes_lib.eval_num_val_examples(classes, k),
        batch_size=batch_size,
        seed=seed,
    )
    accuracies = []
    step = 0
    while len(accuracies) < num_episodes:
        batch = sampler.sample(step)
        step += 1
        accuracies.extend(
            baseline.nearest_class_mean_accuracy(
                batch.tr_input, batch.val_input, batch.val_output
            )
        )  # [B]
    accuracies = np.array(accuracies[:num_episodes])
    return (
        float(accuracies.mean()),
        float(1.96 * accuracies.std() / np.sqrt(num_episodes)),
    )


def _define_flags():
    from absl import flags  # pylint: disable=import-outside-toplevel

    flags.DEFINE_string(
        "data_path",
        None,
        "Folder to write synthetic/center/*.pkl into; default: "
        f"{default_data_path()}.",
    )
    flags.DEFINE_integer(
        "num_episodes", 2000, "Test episodes for each baseline figure."
    )
    return flags.FLAGS


def _main(argv, flags_values):
    import time  # pylint: disable=import-outside-toplevel

    del argv
    data_path = flags_values.data_path or default_data_path()
    start = time.perf_counter()
    try:
        dataset_dir = ensure_synthetic(data_path)
    except embeddings_lib.DataError as error:
        raise SystemExit(f"leo_tf.data.synthetic: {error}") from error
    print(
        f"synthetic data set: {dataset_dir} " f"({time.perf_counter() - start:.1f} s)"
    )
    load = lambda split: embeddings_lib.load_split(  # pylint: disable=g-long-lambda
        data_path, DATASET_NAME, EMBEDDING_CROP, split
    )
    train, test = load("train"), load("test")
    projections = (
        ("raw embeddings", None),
        ("LDA fitted on train", fit_lda_projection(train)),
        ("true signal subspace", signal_basis(seed=0)),
    )
    for name, projection in projections:
        for shots in (1, 5):
            mean, ci95 = nearest_class_mean_accuracy(
                test,
                num_tr_examples_per_class=shots,
                num_episodes=flags_values.num_episodes,
                projection=projection,
            )
            print(
                f"5-way {shots}-shot test accuracy, cosine nearest class "
                f"mean, {name}: {100 * mean:.1f} +- {100 * ci95:.1f}%"
            )


if __name__ == "__main__":
    from absl import app  # pylint: disable=g-import-not-at-top

    _FLAGS = _define_flags()
    app.run(lambda argv: _main(argv, _FLAGS))
