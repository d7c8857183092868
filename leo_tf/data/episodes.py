"""N-way K-shot episodes (problem instances) from per-class embeddings.

An episode draws N distinct classes uniformly; their order defines the labels
0..N-1. From each class it draws K + V distinct examples: the first K are the
support ("tr") set, the other V the query ("val") set. A meta-batch is B
independent episodes:

    tr_input   float32 [B, N, K, D]   L2-normalised per example
    tr_output  int32   [B, N, K, 1]   tr_output[b, n, k, 0] == n
    val_input  float32 [B, N, V, D]
    val_output int32   [B, N, V, 1]

`EpisodeSampler.sample(step)` is a pure function of (seed, stream, step): the
data pipeline has no state beyond the step number, so a run resumed after
preemption sees exactly the batches it would have seen, and replicas with
different streams see different episodes.
"""

from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from leo_tf.data import embeddings as embeddings_lib

_ALIGNMENT = 64  # bytes; TensorFlow's (Eigen's) largest alignment


class Episodes(NamedTuple):
    """One meta-batch: numpy arrays from the sampler, tensors from tf.data."""

    tr_input: Any  # float32 [B, N, K, D], support, unit L2 norm per example
    tr_output: Any  # int32 [B, N, K, 1], labels 0..N-1
    val_input: Any  # float32 [B, N, V, D], query
    val_output: Any  # int32 [B, N, V, 1]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """`x / sqrt(max(sum(x^2), 1e-12))` over the last axis (tf.nn.l2_normalize).

    Args:
      x: float32 `[..., D]`.

    Returns:
      float32 `[..., D]`, a new array.
    """
    x = np.array(x, dtype=np.float32)
    squared_norm = np.einsum("...d,...d->...", x, x)
    x *= (1.0 / np.sqrt(np.maximum(squared_norm, 1e-12)))[..., None]
    return x


def _rejection_tries(sample_size: int, smallest_population: int) -> int:
    """Candidates per row and round for `_sample_distinct`; 0 means shuffle.

    A row of i.i.d. draws is all distinct with probability
    p = prod_j (1 - j / population). Rejection pays when p is large; drawing
    enough candidates per round that a row fails all of them with
    probability <= 1% keeps it to about one round.
    """
    p = float(np.prod(1.0 - np.arange(sample_size) / smallest_population))
    if p < 0.25:
        return 0
    if p == 1.0:
        return 1
    return max(1, int(np.ceil(np.log(0.01) / np.log1p(-p))))


def _sample_distinct(
    rng: np.random.Generator, high, num_rows: int, sample_size: int, tries: int
) -> np.ndarray:
    """Uniformly random ordered samples without replacement, one per row.

    Args:
      rng: the random generator.
      high: row r samples from `range(high)`, or `range(high[r])` when
        `high` is an int64 array `[R]`; every population has at least
        `sample_size` members.
      num_rows: R.
      sample_size: S, the values per row.
      tries: candidate rows of S i.i.d. draws per round (rejection: the
        first candidate without a repeat is kept; fast when S^2 is small
        against the population), or 0 to shuffle the whole population
        (fast when S is close to it).

    Returns:
      int64 `[R, S]`: distinct values per row, every ordered S-tuple
      equally likely.
    """
    per_row = not np.isscalar(high)
    if tries:
        # The first all-distinct candidate in an i.i.d. sequence is uniform
        # over the all-distinct tuples, so rejection is exact.
        out = np.empty((num_rows, sample_size), dtype=np.int64)
        todo = np.arange(num_rows)
        while todo.size:
            todo_high = high[todo][:, None, None] if per_row else high
            draws = rng.integers(0, todo_high, size=(todo.size, tries, sample_size))
            ordered = np.sort(draws, axis=2)
            distinct = (ordered[..., 1:] != ordered[..., :-1]).all(axis=2)
            accepted = distinct.any(axis=1)  # [T]
            first = distinct.argmax(axis=1)  # [T]
            out[todo[accepted]] = draws[accepted, first[accepted]]
            todo = todo[~accepted]
        return out
    largest = int(high.max()) if per_row else int(high)
    shuffled = rng.permuted(
        np.broadcast_to(np.arange(largest), (num_rows, largest)), axis=1
    )
    if not per_row or (high == largest).all():
        return shuffled[:, :sample_size]
    # A uniform shuffle of range(largest), read in order and restricted to the
    # values below a row's population, is a uniform shuffle of that population.
    valid = shuffled < high[:, None]
    keep = valid & (np.cumsum(valid, axis=1) <= sample_size)
    return shuffled[keep].reshape(num_rows, sample_size)


class EpisodeSampler:
    """Samples meta-batches of N-way K-shot episodes from one split.

    Every example is L2-normalised once, here, and all of them are stored in
    one float32 array `[total, D]` with each class in a contiguous block, so
    sampling a batch is: draw indices (`sample_indices`), then two gathers
    into the `[B, N, K, D]` and `[B, N, V, D]` outputs, by numpy (`sample`)
    or by TensorFlow from `embeddings_tensor`, the same memory (`make_dataset`).
    """

    def __init__(
        self,
        classes: embeddings_lib.ClassEmbeddings,
        *,
        num_classes: int,
        num_tr_examples_per_class: int,
        num_val_examples_per_class: int,
        batch_size: int,
        seed: int,
        stream: int = 0,
        split: str = "",
    ):
        """Validates the episode shape against the data and indexes it.

        Args:
          classes: the split's examples.
          num_classes: N.
          num_tr_examples_per_class: K, support examples per class.
          num_val_examples_per_class: V, query examples per class.
          batch_size: B, episodes per meta-batch.
          seed: non-negative int; with `stream` and the step it fixes the
            batch.
          stream: non-negative int telling apart replicas (or any other
            consumers) that share a seed.
          split: the split's name, for error messages (optional).

        Raises:
          DataError: the split has fewer than N classes or a class with
            fewer than K + V examples.
          ValueError: a size is not positive, or seed or stream negative.
        """
        sizes = dict(
            num_classes=num_classes,
            num_tr_examples_per_class=num_tr_examples_per_class,
            num_val_examples_per_class=num_val_examples_per_class,
            batch_size=batch_size,
        )
        for name, value in sizes.items():
            _check_int(name, value, minimum=1)
        _check_int("seed", seed, minimum=0)
        _check_int("stream", stream, minimum=0)
        self.num_classes = int(num_classes)
        self.num_tr_examples_per_class = int(num_tr_examples_per_class)
        self.num_val_examples_per_class = int(num_val_examples_per_class)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.stream = int(stream)
        self.examples_per_class = (
            self.num_tr_examples_per_class + self.num_val_examples_per_class
        )
        embeddings_lib.check_episode_requirements(
            classes,
            num_classes=self.num_classes,
            examples_per_class=self.examples_per_class,
            split=split,
        )

        self.class_ids = classes.class_ids
        self.embedding_dim = classes.embedding_dim
        self._counts = np.array(classes.examples_per_class, dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._counts)[:-1]])
        self._embeddings = _aligned_empty(
            (classes.num_examples, self.embedding_dim), np.float32
        )  # [total, D]
        self._embeddings_tensor = None
        for offset, array in zip(self._offsets, classes.embeddings.values()):
            self._embeddings[offset : offset + len(array)] = l2_normalize(array)

        num_all = len(self._counts)
        self._class_tries = _rejection_tries(self.num_classes, num_all)
        self._example_tries = _rejection_tries(
            self.examples_per_class, int(self._counts.min())
        )
        # Equal class sizes (miniImageNet) let every row share one bound.
        self._same_size = bool((self._counts == self._counts[0]).all())

        b, n, d = self.batch_size, self.num_classes, self.embedding_dim
        k, v = self.num_tr_examples_per_class, self.num_val_examples_per_class
        self._shapes = Episodes((b, n, k, d), (b, n, k, 1), (b, n, v, d), (b, n, v, 1))
        self._dtypes = Episodes(np.float32, np.int32, np.float32, np.int32)
        labels = np.arange(n, dtype=np.int32)[None, :, None, None]
        self._tr_labels = np.broadcast_to(labels, self._shapes.tr_output)
        self._val_labels = np.broadcast_to(labels, self._shapes.val_output)

    @property
    def normalized_embeddings(self) -> np.ndarray:
        """float32 `[total, D]`: every example, unit norm, class by class."""
        return self._embeddings

    @property
    def embeddings_tensor(self) -> tf.Tensor:
        """`normalized_embeddings` as a tf.Tensor on the CPU, sharing its memory.

        Made on first use, through DLPack: TensorFlow's own conversion of a
        numpy array copies it, and a second copy of a tieredImageNet training
        split would be another 1.2 GB.
        """
        if self._embeddings_tensor is None:
            with tf.device("/cpu:0"):
                self._embeddings_tensor = tf.experimental.dlpack.from_dlpack(
                    self._embeddings.__dlpack__()
                )
        return self._embeddings_tensor

    @property
    def class_offsets(self) -> np.ndarray:
        """int64 `[C]`: the row of each class's first example."""
        return self._offsets

    @property
    def element_spec(self) -> Episodes:
        """`Episodes` of `tf.TensorSpec`s with the batch's static shapes."""
        return Episodes(
            *(
                tf.TensorSpec(shape, tf.as_dtype(dtype))
                for shape, dtype in zip(self._shapes, self._dtypes)
            )
        )

    def sample_indices(self, step: int):
        """The classes and examples of meta-batch `step`.

        Args:
          step: non-negative int.

        Returns:
          classes: int64 `[B, N]`, indices into `class_ids`; label n of
            episode b is class `classes[b, n]`.
          rows: int64 `[B, N, K + V]`, rows of `normalized_embeddings`; the
            first K of each class are its support examples.
        """
        _check_int("step", step, minimum=0)
        rng = np.random.default_rng([self.seed, self.stream, int(step)])
        b, n, s = self.batch_size, self.num_classes, self.examples_per_class
        classes = _sample_distinct(
            rng, len(self._counts), b, n, self._class_tries
        )  # [B, N]
        high = (
            int(self._counts[0]) if self._same_size else self._counts[classes.ravel()]
        )
        examples = _sample_distinct(
            rng, high, b * n, s, self._example_tries
        )  # [B * N, S]
        rows = self._offsets[classes][..., None] + examples.reshape(b, n, s)
        return classes, rows

    def sample(self, step: int) -> Episodes:
        """Meta-batch `step`: a pure function of (seed, stream, step).

        Args:
          step: non-negative int.

        Returns:
          `Episodes` of new numpy arrays: tr_input float32 `[B, N, K, D]`,
          tr_output int32 `[B, N, K, 1]`, val_input float32 `[B, N, V, D]`,
          val_output int32 `[B, N, V, 1]`.
        """
        _, rows = self.sample_indices(step)
        k = self.num_tr_examples_per_class
        return Episodes(
            np.take(self._embeddings, rows[..., :k], axis=0),
            self._tr_labels.copy(),
            np.take(self._embeddings, rows[..., k:], axis=0),
            self._val_labels.copy(),
        )


def _check_int(name, value, minimum):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise ValueError(f"{name}: expected an int >= {minimum}, found " f"{value!r}")


def _aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data is 64-byte aligned.

    TensorFlow (Eigen) expects aligned buffers; DLPack hands this one over
    as it is.
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    buffer = np.empty(size + _ALIGNMENT, dtype=np.uint8)
    base = -buffer.ctypes.data % _ALIGNMENT
    return buffer[base : base + size].view(dtype).reshape(shape)


def eval_num_val_examples(
    classes: embeddings_lib.ClassEmbeddings,
    num_tr_examples_per_class: int,
    total_examples_per_class: int = 600,
) -> int:
    """V for meta-validation and meta-test: all remaining examples of a class.

    Args:
      classes: the split's examples.
      num_tr_examples_per_class: K.
      total_examples_per_class: the authors' 600 (miniImageNet's class
        size); a smaller smallest class lowers it to that class's size.

    Returns:
      `min(total_examples_per_class, smallest class) - K`, e.g. 599 for
      miniImageNet 1-shot.

    Raises:
      DataError: the smallest class has no examples left after K.
    """
    total = min(total_examples_per_class, classes.min_examples_per_class)
    if total <= num_tr_examples_per_class:
        counts = classes.examples_per_class
        smallest = min(range(len(counts)), key=counts.__getitem__)
        count, class_id = counts[smallest], classes.class_ids[smallest]
        raise embeddings_lib.DataError(
            f"{classes.source}: expected more than {num_tr_examples_per_class} "
            f"examples in every class, to leave query examples after "
            f"{num_tr_examples_per_class} support examples, found class "
            f"{class_id!r} with {count}"
        )
    return total - num_tr_examples_per_class


def make_dataset(
    sampler: EpisodeSampler, first_step: int, num_steps: int | None = None
) -> tf.data.Dataset:
    """The meta-batches of steps `first_step`, `first_step + 1`, ... as tf.data.

    Each element is `(step, episodes)`: an int64 scalar and `Episodes` of
    tensors equal to `sampler.sample(step)`, with static shapes.

    Only the indices come from Python: a `tf.numpy_function` calls
    `sampler.sample_indices(step)` (int64 `[B, N, K + V]`, a few KB), and
    TensorFlow gathers the rows from `sampler.embeddings_tensor`, the split's
    normalised embeddings held once, in the sampler's own memory. The labels,
    the same for every batch, are built in TensorFlow. Python runs only
    inside the consumer's own request: a tf.data worker thread that calls
    into Python while the interpreter exits deadlocks the exit (the process
    hangs after the program ends). For that reason the dataset turns off
    tf.data's automatic prefetch injection and map parallelisation; do not
    add `.prefetch()` after it. It turns off tf.data's other default graph
    rewrites too: with them, a 1.17 GB split was held twice (BUILD.md,
    Performance).

    Args:
      sampler: the episode sampler.
      first_step: the first step, e.g. the restored global step.
      num_steps: how many steps; None for an endless dataset.

    Returns:
      `tf.data.Dataset` of `(step, Episodes)`.
    """
    if num_steps is None:
        steps = tf.data.Dataset.counter(start=first_step, dtype=tf.int64)
    else:
        steps = tf.data.Dataset.range(first_step, first_step + num_steps)
    spec = sampler.element_spec
    b, n, k = spec.tr_input.shape[:3]
    rows_shape = [b, n, k + spec.val_input.shape[2]]
    embeddings = sampler.embeddings_tensor

    def sample_rows(step):
        return sampler.sample_indices(int(step))[1]

    def labels(shape):
        # The same for every batch: label n for the n-th class.
        return tf.broadcast_to(
            tf.reshape(tf.range(n, dtype=tf.int32), [1, n, 1, 1]), shape
        )

    def to_episodes(step):
        rows = tf.numpy_function(sample_rows, [step], tf.int64, stateful=True)
        rows.set_shape(rows_shape)
        return step, Episodes(
            tf.gather(embeddings, rows[..., :k]),
            labels(spec.tr_output.shape),
            tf.gather(embeddings, rows[..., k:]),
            labels(spec.val_output.shape),
        )

    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.experimental_optimization.inject_prefetch = False
    options.experimental_optimization.map_parallelization = False
    return steps.map(to_episodes).with_options(options)
