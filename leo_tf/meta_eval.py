"""Meta-validation and meta-test: the project's one batch-evaluation loop.

`MetaEvaluator(model, sampler).evaluate(first_batch, num_batches)` scores the
sampler's meta-batches first_batch, first_batch + 1, ... exactly as
`model.run_episodes(sampler.sample(step))` would (up to float32 rounding),
and, where it is reported (meta-test), the cosine nearest-class-mean
baseline (`baseline.py`) on the same episodes, without ever building the
query set `[B, N, V, D]`: at V=599 that
is 1.5 GB per batch of 200 episodes, and copying it, then streaming it
through narrow `[.., D] x [D, N]` matmuls, cost six times the arithmetic.

The split's normalised examples live once in TensorFlow. Per batch, only
indices come in (`EpisodeSampler.sample_indices`), with the support sets and
their prototypes (small). After adaptation, every class used in the batch is
scored once against the columns of every episode that uses it: that
episode's N adapted class weights and, with the baseline, its N prototypes.
That is one large matmul per class, `[S_c, D] x [D, G N M_c]` (S_c examples,
M_c episodes, G = 2 with the baseline, else 1), compute-bound where the
narrow per-episode ones were memory-bound. Each product is scored right away
(LEO right or wrong, its cross-entropy, the baseline right or wrong), and
each episode's queries' scores are gathered from those (at most 12 bytes per
query, not the 2.5 kB of its embedding). Where the
query sets are small against the classes (V much below the class size),
gathering the queries first is cheaper, and `prefers_grouped` picks that.

Results are a pure function of (seed, batch index), as the sampler's
batches are.
"""

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from leo_tf import baseline, steps
from leo_tf.memory import MAX_GATHERED_BYTES

# See prefers_grouped.
GROUPED_WORK_RATIO = 30
CLASS_OVERHEAD_WORK = 2.5e6


class EpisodeResults(NamedTuple):
    """Per-episode results of meta-validation or meta-test, batch by batch."""

    accuracy: np.ndarray  # float [E], LEO's fraction of query examples right
    query_loss: np.ndarray  # float [E], LEO's mean query cross-entropy
    # float [E], nearest class mean's accuracy; None without the baseline
    baseline_accuracy: np.ndarray


class MetaEvaluator:
    """Evaluates a model on a sampler's meta-batches (no noise, no dropout).

    Built once per (model, sampler): the compiled step is traced on the first
    batch and reused for every later `evaluate` call (the trainer validates
    at every checkpoint with the current weights).
    """

    def __init__(
        self,
        model,
        sampler,
        *,
        with_baseline=True,
        jit_compile=False,
        num_towers=1,
        grouped=None,
    ):
        """Puts the split's examples into TensorFlow and compiles the step.

        Args:
          model: a LEO model (its adapt method is used; weights read at each
            call).
          sampler: the split's EpisodeSampler.
          with_baseline: also score the nearest-class-mean baseline (half of
            the query arithmetic); without it, `baseline_accuracy` is None.
          jit_compile: compile the adaptation with XLA (the query scores,
            whose shapes change from batch to batch, never are).
          num_towers: adapt the meta-batch in this many equal parts, run side
            by side (see steps.run_towers); B must be a multiple of it.
          grouped: score the queries class by class (`_grouped_query_scores`)
            or gather them first (`_gathered_query_scores`); None chooses the
            one with less work (`prefers_grouped`).
        """
        if sampler.batch_size % num_towers:
            raise ValueError(
                f"num_towers={num_towers}: must divide the batch size "
                f"{sampler.batch_size}"
            )
        self._model = model
        self._sampler = sampler
        self._num_towers = num_towers
        self.with_baseline = with_baseline
        self.grouped = prefers_grouped(sampler) if grouped is None else grouped
        dtype = model.compute_dtype
        embeddings = sampler.normalized_embeddings  # [total, D]
        # The sampler's own memory (no copy), cast only for float64 models.
        self._examples = tf.cast(sampler.embeddings_tensor, dtype)
        ends = np.append(sampler.class_offsets[1:], len(embeddings))
        self._class_slices = list(zip(sampler.class_offsets, ends))
        self._adapt = tf.function(self._adapted_weights, jit_compile=jit_compile)
        b, n = sampler.batch_size, sampler.num_classes
        k, v = sampler.num_tr_examples_per_class, sampler.num_val_examples_per_class
        d = sampler.embedding_dim
        self._step = tf.function(
            self._score_batch,
            input_signature=[
                tf.TensorSpec([b, n, k, d], dtype),
                tf.TensorSpec([b, n, d] if with_baseline else [0], dtype),
                tf.TensorSpec([b, n], tf.int32),
                tf.TensorSpec([b, n, v], tf.int32),
            ],
        )

    def evaluate(self, first_batch, num_batches, after_batch=None):
        """EpisodeResults of batches first_batch .. first_batch + num_batches - 1.

        Each array has num_batches * B entries, batch by batch, episode by
        episode within a batch. after_batch, if given, is called after each
        batch with the number of episodes evaluated so far; an exception it
        raises ends the evaluation.
        """
        parts = []
        for step in range(first_batch, first_batch + num_batches):
            parts.append(self.evaluate_batch(step))
            if after_batch is not None:
                after_batch(len(parts) * self._sampler.batch_size)
        return EpisodeResults(
            *(
                None if values[0] is None else np.concatenate(values)
                for values in zip(*parts)
            )
        )

    def evaluate_episodes(self, num_episodes, after_batch=None):
        """EpisodeResults of the first `num_episodes` episodes of batches 0,
        1, ...: the last batch's episodes beyond them are dropped.

        after_batch: as in `evaluate`, called with the episodes evaluated so
        far, at most num_episodes.
        """
        num_batches = -(-num_episodes // self._sampler.batch_size)

        def report(done):
            after_batch(min(done, num_episodes))

        results = self.evaluate(0, num_batches, after_batch and report)
        return EpisodeResults(
            *(None if values is None else values[:num_episodes] for values in results)
        )

    def evaluate_batch(self, step):
        """EpisodeResults of the sampler's meta-batch `step` (B episodes)."""
        inputs = self.batch_inputs(step)
        results = [x.numpy() for x in self._step(*inputs)]
        return EpisodeResults(*results, *[None] * (3 - len(results)))

    def batch_inputs(self, step):
        """The compiled step's inputs for meta-batch `step`.

        Returns:
          support [B, N, K, D] normalised embeddings; their nearest-class-mean
          prototypes [B, N, D] (without the baseline, an empty [0]); classes
          int32 [B, N], indices of the split's classes; query rows int32
          [B, N, V], rows within each class.
        """
        sampler = self._sampler
        classes, rows = sampler.sample_indices(step)
        k = sampler.num_tr_examples_per_class
        support = sampler.normalized_embeddings[rows[..., :k]]  # [B, N, K, D]
        query_rows = rows[..., k:] - sampler.class_offsets[classes][..., None]
        dtype = self._examples.dtype.as_numpy_dtype
        if self.with_baseline:
            prototypes = baseline.class_prototypes(support).astype(dtype)
        else:
            prototypes = np.zeros([0], dtype)
        return (
            support.astype(dtype),
            prototypes,
            classes.astype(np.int32),
            query_rows.astype(np.int32),
        )

    def _adapted_weights(self, support):
        """[B, N, K, D] -> class weights [B, N, D], adapted in towers.

        With batched matmuls on every host: the support sets' products are
        small, and per episode (`ops.per_episode_matmul`) a batch of 200
        episodes traces thousands of MatMuls (6.0 against 2.2 s to trace,
        the same speed after; BUILD.md, Performance).
        """
        n = tf.shape(support)[1]
        labels = tf.broadcast_to(
            tf.reshape(tf.range(n, dtype=tf.int32), [1, -1, 1, 1]),
            tf.concat([tf.shape(support)[:3], [1]], 0),
        )
        parts = zip(
            tf.split(support, self._num_towers), tf.split(labels, self._num_towers)
        )
        with steps.products(self._model, tf.matmul) as model:
            return tf.concat([model.adapt(x, y).class_weights for x, y in parts], 0)

    def _score_batch(self, support, prototypes, classes, query_rows):
        """Accuracy, query loss and (with the baseline) its accuracy, each [B]."""
        columns = self._adapt(support)  # [B, N, D]
        if self.with_baseline:
            columns = tf.concat([columns, prototypes], axis=1)  # [B, 2N, D]
        if self.grouped:
            scores = self._grouped_query_scores(columns, classes, query_rows)
        else:
            scores = self._gathered_query_scores(columns, classes, query_rows)
        return tf.unstack(tf.reduce_mean(scores, axis=[1, 2]), axis=-1)

    def _gathered_query_scores(self, columns, classes, query_rows):
        """`_grouped_query_scores` by gathering the query examples first."""
        batch, num_slots, num_val = query_rows.shape
        offsets = tf.constant(self._sampler.class_offsets, tf.int32)
        rows = query_rows + tf.gather(offsets, classes)[..., None]  # [B, N, V]
        logits = tf.matmul(
            columns[:, None], tf.gather(self._examples, rows), transpose_b=True
        )  # [B, N, G N, V]
        scores = _pair_scores(
            tf.reshape(logits, [batch * num_slots, -1, num_val]),
            tf.tile(tf.range(num_slots), [batch]),
            columns.shape[1] // num_slots,
        )  # [B N, V, R]
        return tf.reshape(scores, [batch, num_slots, num_val, -1])

    def _grouped_query_scores(self, columns, classes, query_rows):
        """`_pair_scores` of every episode's query examples.

        Each class used in the batch is multiplied once by the columns of all
        the episodes that use it, and scored; each episode's queries' scores
        are then gathered.

        Args:
          columns: [B, G N, D], each episode's class weights, then (G = 2)
            its prototypes.
          classes: int32 [B, N], the class in each episode's slots.
          query_rows: int32 [B, N, V], query examples' rows within their class.

        Returns:
          [B, N, V, R], see `_pair_scores`.
        """
        batch, num_slots = classes.shape
        num_columns = columns.shape[1]  # G N
        num_all = len(self._class_slices)
        flat_classes = tf.reshape(classes, [-1])  # [P], P = B N (episode, slot)
        order = tf.argsort(flat_classes, stable=True)  # pairs grouped by class
        counts = tf.math.bincount(flat_classes, minlength=num_all, maxlength=num_all)
        scores = []
        for (begin, end), pairs in zip(
            self._class_slices, tf.split(order, counts, num=num_all)
        ):
            episode_columns = tf.gather(columns, pairs // num_slots)  # [M_c, G N, D]
            logits = tf.matmul(
                tf.reshape(episode_columns, [-1, columns.shape[2]]),
                self._examples[begin:end],  # [S_c, D]
                transpose_b=True,
            )  # [M_c G N, S_c]
            logits = tf.reshape(logits, [-1, num_columns, end - begin])
            pair_scores = _pair_scores(
                logits, pairs % num_slots, num_columns // num_slots
            )  # [M_c, S_c, R]
            scores.append(tf.reshape(pair_scores, [-1, pair_scores.shape[2]]))
        # Class c's scores [M_c, S_c, R] start at row base_c of the
        # concatenation; those of its j-th pair's example s at
        # base_c + j S_c + s.
        sizes = tf.constant([end - begin for begin, end in self._class_slices])
        base = tf.cumsum(sizes * counts, exclusive=True)  # [C]
        first = tf.cumsum(counts, exclusive=True)  # [C], the class's first pair
        position = tf.scatter_nd(
            order[:, None], tf.range(batch * num_slots), [batch * num_slots]
        )  # [P], each pair's place in `order`
        rank = position - tf.gather(first, flat_classes)  # [P], j
        start = tf.gather(base, flat_classes) + rank * tf.gather(sizes, flat_classes)
        index = tf.reshape(start, [batch, num_slots, 1]) + query_rows  # [B, N, V]
        return tf.gather(tf.concat(scores, 0), index)


def prefers_grouped(sampler):
    """Whether to score the queries class by class rather than gather them.

    Grouped, an (episode, class) pair costs about 2N S D multiply-adds (every
    example of its class, S on average, against its episode's 2N columns,
    the baseline's included) at matmul speed, and each of the split's C
    classes adds the fixed cost of its ops, worth CLASS_OVERHEAD_WORK
    multiply-adds (~50 us; 659 classes of 20, Omniglot's test split: 118
    against 80 ms per batch of 200, 181 against 38 s to trace); gathered, a
    pair's V query examples (D floats each) are copied and streamed through
    narrow matmuls at memory speed, which took as long as GROUPED_WORK_RATIO
    times as many multiply-adds (5-way 1-shot, 20 classes of 600: gathered
    was faster at V=15 and V=100, grouped at V=599). Gathered query sets
    larger than MAX_GATHERED_BYTES are never built.
    """
    num_all = len(sampler.class_offsets)
    mean_class_size = len(sampler.normalized_embeddings) / num_all
    pairs = sampler.batch_size * sampler.num_classes
    overhead = num_all * CLASS_OVERHEAD_WORK / (pairs * sampler.embedding_dim)
    grouped_work = 2 * sampler.num_classes * mean_class_size + overhead
    queries_bytes = (
        4 * pairs * sampler.num_val_examples_per_class * sampler.embedding_dim
    )
    return (
        grouped_work <= GROUPED_WORK_RATIO * sampler.num_val_examples_per_class
        or queries_bytes > MAX_GATHERED_BYTES
    )


def _pair_scores(logits, labels, num_groups):
    """Per-query results of (episode, class) pairs.

    Args:
      logits: [P, G N, S]: of S examples of one class per pair, the logits
        against its episode's N class weights, then (G = 2) against its N
        prototypes.
      labels: int32 [P], the class's label in the pair's episode.
      num_groups: G, 1 (LEO) or 2 (LEO and the baseline).

    Returns:
      [P, S, R], R = G + 1: LEO's prediction is right (1.0 or 0.0; argmax,
      the first of equal maxima as in LEO.run_episodes), its softmax
      cross-entropy, and (G = 2) the nearest class mean's prediction is
      right.
    """
    leo_logits, *baseline_logits = tf.split(logits, num_groups, axis=1)  # [P, N, S]
    # ops.softmax_cross_entropy's formula, over axis 1.
    shifted = leo_logits - tf.reduce_max(leo_logits, axis=1, keepdims=True)
    label_logits = tf.gather(shifted, labels, axis=1, batch_dims=1)  # [P, S]
    loss = tf.math.log(tf.reduce_sum(tf.exp(shifted), axis=1)) - label_logits
    scores = [_correct(leo_logits, labels), loss]
    scores += [_correct(x, labels) for x in baseline_logits]
    return tf.stack(scores, axis=-1)


def _correct(logits, labels):
    """[P, N, S], [P] -> [P, S]: 1.0 where the argmax over N is the label."""
    predictions = tf.argmax(logits, axis=1, output_type=labels.dtype)
    return tf.cast(tf.equal(predictions, labels[:, None]), logits.dtype)
