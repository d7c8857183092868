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

import threading
import time
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
    sampling a batch is: draw indices, then two gathers straight into the
    `[B, N, K, D]` and `[B, N, V, D]` outputs.
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
        self._embeddings = np.empty(
            (classes.num_examples, self.embedding_dim), dtype=np.float32
        )  # [total, D]
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
        self._layout = _AlignedLayout(self._shapes, self._dtypes)

    @property
    def normalized_embeddings(self) -> np.ndarray:
        """float32 `[total, D]`: every example, unit norm, class by class."""
        return self._embeddings

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
        out = self._layout.new_arrays()
        k = self.num_tr_examples_per_class
        # Every row index is valid: mode="clip" only spares numpy the
        # bounds-checking copy that the default mode="raise" makes with `out`.
        np.take(self._embeddings, rows[..., :k], axis=0, out=out.tr_input, mode="clip")
        np.take(self._embeddings, rows[..., k:], axis=0, out=out.val_input, mode="clip")
        np.copyto(out.tr_output, self._tr_labels)
        np.copyto(out.val_output, self._val_labels)
        return out


def _check_int(name, value, minimum):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise ValueError(f"{name}: expected an int >= {minimum}, found " f"{value!r}")


class _AlignedLayout:
    """Allocates arrays of fixed shapes in one buffer, each 64-byte aligned.

    TensorFlow takes over an aligned array returned by `tf.numpy_function`
    without copying it; an unaligned one it copies, which for a 1.5 GB
    evaluation batch costs as much as sampling it.
    """

    def __init__(self, shapes: Episodes, dtypes: Episodes):
        self._parts = []  # (start byte, size in bytes, shape, dtype)
        start = 0
        for shape, dtype in zip(shapes, dtypes):
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            self._parts.append((start, size, shape, dtype))
            start += -(-size // _ALIGNMENT) * _ALIGNMENT
        self._num_bytes = start

    def new_arrays(self) -> Episodes:
        buffer = np.empty(self._num_bytes + _ALIGNMENT, dtype=np.uint8)
        base = -buffer.ctypes.data % _ALIGNMENT
        return Episodes(
            *(
                buffer[base + start : base + start + size].view(dtype).reshape(shape)
                for start, size, shape, dtype in self._parts
            )
        )


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
        raise embeddings_lib.DataError(
            f"{classes.source}: expected more than {num_tr_examples_per_class} "
            f"examples in every class, to leave query examples after "
            f"{num_tr_examples_per_class} support examples, found a class "
            f"with {classes.min_examples_per_class}"
        )
    return total - num_tr_examples_per_class


class _Prefetcher:
    """Samples the steps after the last one asked for, in a daemon thread.

    `get(step)` returns `sampler.sample(step)`: from the thread's results when
    it has sampled (or is sampling) that step, else sampled on the spot, so
    the results never depend on timing, only the speed does. The thread keeps
    up to `depth` steps ahead of the last request (never past `last_step`)
    and follows any jump or restart. It is a daemon thread outside
    TensorFlow: an exiting interpreter neither waits for it nor can deadlock
    with it. After `idle_seconds` without a request it drops what it holds
    and ends (a later request starts a new one), so a dataset that is no
    longer read does not keep batches, possibly GBs, alive.
    """

    def __init__(
        self,
        sampler: "EpisodeSampler",
        depth: int,
        last_step: int | None = None,
        idle_seconds: float = 30.0,
    ):
        self._sampler = sampler
        self._depth = depth
        self._last_step = last_step
        self._idle_seconds = idle_seconds
        self._condition = threading.Condition()
        self._ready = {}  # step -> Episodes
        self._first_wanted = None  # the step the consumer asks for next
        self._in_flight = None  # the step the thread is sampling
        self._last_request = time.monotonic()
        self._thread = None
        self._failed = False

    def _wanted(self) -> range:
        if self._first_wanted is None:
            return range(0)
        stop = self._first_wanted + self._depth
        if self._last_step is not None:
            stop = min(stop, self._last_step + 1)
        return range(self._first_wanted, stop)

    def _next_step(self):
        """The step to sample next, or None once idle too long."""
        while True:
            todo = [s for s in self._wanted() if s not in self._ready]
            if todo:
                return todo[0]
            idle = time.monotonic() - self._last_request
            if idle >= self._idle_seconds:
                return None
            self._condition.wait(self._idle_seconds - idle)

    def _run(self):
        while True:
            with self._condition:
                step = self._in_flight = self._next_step()
                if step is None:
                    self._ready.clear()
                    self._thread = None
                    return
            try:
                episodes = self._sampler.sample(step)
            except Exception:  # pylint: disable=broad-except
                episodes = None  # get() samples it again and raises
            with self._condition:
                self._in_flight = None
                if episodes is None:
                    self._failed = True
                    self._thread = None
                elif step in self._wanted():
                    self._ready[step] = episodes
                self._condition.notify_all()
                if self._failed:
                    return
            episodes = None  # else held while idle, possibly GBs

    def get(self, step: int) -> Episodes:
        with self._condition:
            self._last_request = time.monotonic()
            if self._thread is None and not self._failed:
                self._thread = threading.Thread(
                    target=self._run, name="leo_tf-episode-prefetch", daemon=True
                )
                self._thread.start()
            self._first_wanted = step
            for stale in [s for s in self._ready if s not in self._wanted()]:
                del self._ready[stale]
            self._condition.notify_all()
            while step not in self._ready and self._in_flight == step:
                self._condition.wait()
            episodes = self._ready.pop(step, None)
            self._first_wanted = step + 1
            self._condition.notify_all()
        if episodes is None:
            episodes = self._sampler.sample(step)
        return episodes


def make_dataset(
    sampler: EpisodeSampler,
    first_step: int,
    num_steps: int | None = None,
    *,
    prefetch: int = 2,
) -> tf.data.Dataset:
    """The meta-batches of steps `first_step`, `first_step + 1`, ... as tf.data.

    Each element is `(step, episodes)`: an int64 scalar and `Episodes` of
    tensors equal to `sampler.sample(step)`, with static shapes.

    Sampling overlaps the consumer: a Python daemon thread samples the next
    `prefetch` steps ahead, and the dataset's `tf.numpy_function` only hands
    over the two input arrays (aligned, so TensorFlow takes them without a
    copy); the labels, the same for every batch, are built in TensorFlow.
    The prefetching is deliberately not tf.data's: a tf.data worker thread
    that calls into Python while the interpreter exits deadlocks the exit
    (the process hangs after the program ends). For the same reason the
    dataset turns off tf.data's automatic prefetch injection and map
    parallelisation; do not add `.prefetch()` after it. A finite dataset
    samples nothing past its last step, and a dataset left unread for 30 s
    frees the batches sampled ahead.

    Args:
        sampler: the episode sampler.
        first_step: the first step, e.g. the restored global step.
        num_steps: how many steps; None for an endless dataset.
        prefetch: meta-batches to sample ahead (at least 1). An evaluation
            batch of 200 x 5-way 1-shot with V=599 is 1.5 GB; mind memory.

    Returns:
        `tf.data.Dataset` of `(step, Episodes)`.
    """
    if int(prefetch) != prefetch or prefetch < 1:
        raise ValueError(f"prefetch: expected a positive int, found " f"{prefetch!r}")
    if num_steps is None:
        steps = tf.data.Dataset.counter(start=first_step, dtype=tf.int64)
    else:
        steps = tf.data.Dataset.range(first_step, first_step + num_steps)
    last_step = None if num_steps is None else first_step + num_steps - 1
    prefetcher = _Prefetcher(sampler, int(prefetch), last_step=last_step)
    spec = sampler.element_spec

    def get_inputs(step):
        episodes = prefetcher.get(int(step))
        return episodes.tr_input, episodes.val_input

    def labels(shape):
        # The same for every batch: label n for the n-th class.
        n = shape[1]
        return tf.broadcast_to(
            tf.reshape(tf.range(n, dtype=tf.int32), [1, n, 1, 1]), shape
        )

    def to_episodes(step):
        tr_input, val_input = tf.numpy_function(
            get_inputs, [step], [tf.float32, tf.float32], stateful=True
        )
        tr_input.set_shape(spec.tr_input.shape)
        val_input.set_shape(spec.val_input.shape)
        return step, Episodes(
            tr_input,
            labels(spec.tr_output.shape),
            val_input,
            labels(spec.val_output.shape),
        )

    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False
    options.experimental_optimization.map_parallelization = False
    return steps.map(to_episodes).with_options(options)
