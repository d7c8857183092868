"""Tests for leo_tf.data.episodes: N-way K-shot sampling and the tf.data pipeline."""

import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from leo_tf.data import embeddings
from leo_tf.data import episodes
from leo_tf.data.embeddings import DataError
from tests import run_fixtures


def make_classes(counts, dim=8, seed=0):
    """Classes of the given sizes with random (so all distinct) rows."""
    rng = np.random.default_rng(seed)
    return embeddings.ClassEmbeddings(
        source="mem.pkl",
        embeddings={
            f"c{i:02d}": rng.standard_normal((n, dim)) * (i + 1)
            for i, n in enumerate(counts)
        },
    )


# tieredImageNet-like: classes of different sizes.
UNEQUAL = [20, 23, 31, 40, 25, 20, 37, 22, 29, 33]


def lookup_table(classes):
    """(unit rows float64 [total, D], (class, example) int [total, 2]).

    Normalised here, independently of the sampler, in float64.
    """
    units, ids = [], []
    for c, array in enumerate(classes.embeddings.values()):
        array = array.astype(np.float64)
        units.append(array / np.linalg.norm(array, axis=1, keepdims=True))
        ids.extend((c, i) for i in range(len(array)))
    return np.concatenate(units), np.array(ids)


def find(table, vectors):
    """[..., D] vectors -> int [..., 2]: (class, example) of each vector.

    Each vector must equal one normalised example up to float32 rounding.
    """
    units, ids = table
    flat = vectors.reshape(-1, vectors.shape[-1]).astype(np.float64)
    similarity = flat @ units.T
    best = similarity.argmax(axis=1)
    np.testing.assert_allclose(similarity.max(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(flat, units[best], atol=1e-6)
    return ids[best].reshape(vectors.shape[:-1] + (2,))


def sampler_for(classes, n=5, k=1, v=3, b=4, seed=0, stream=0):
    return episodes.EpisodeSampler(
        classes,
        num_classes=n,
        num_tr_examples_per_class=k,
        num_val_examples_per_class=v,
        batch_size=b,
        seed=seed,
        stream=stream,
    )


# ---------------------------------------------------------------------------
# Shapes and content.


def test_shapes_dtypes_and_element_spec():
    sampler = sampler_for(make_classes(UNEQUAL), n=5, k=2, v=3, b=4)
    batch = sampler.sample(0)
    assert batch.tr_input.shape == (4, 5, 2, 8)
    assert batch.tr_output.shape == (4, 5, 2, 1)
    assert batch.val_input.shape == (4, 5, 3, 8)
    assert batch.val_output.shape == (4, 5, 3, 1)
    assert batch.tr_input.dtype == np.float32
    assert batch.val_input.dtype == np.float32
    assert batch.tr_output.dtype == np.int32
    assert batch.val_output.dtype == np.int32
    spec = sampler.element_spec
    for array, tensor_spec in zip(batch, spec):
        assert tuple(tensor_spec.shape) == array.shape
        assert tensor_spec.dtype == tf.as_dtype(array.dtype)


def test_examples_are_l2_normalised_copies_of_the_data():
    classes = make_classes(UNEQUAL)
    batch = sampler_for(classes, b=6).sample(3)
    for array in (batch.tr_input, batch.val_input):
        np.testing.assert_allclose(np.linalg.norm(array, axis=-1), 1.0, rtol=1e-6)
    # Every vector is exactly some example, normalised (checked by lookup).
    find(lookup_table(classes), batch.tr_input)
    find(lookup_table(classes), batch.val_input)


def test_l2_normalize_matches_tf_and_keeps_zero_rows_finite():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-7, 0.0]], dtype=np.float32)
    expected = tf.nn.l2_normalize(x, axis=-1).numpy()
    np.testing.assert_allclose(episodes.l2_normalize(x), expected, rtol=1e-6)
    np.testing.assert_array_equal(episodes.l2_normalize(x)[1], [0.0, 0.0])


@pytest.mark.parametrize(
    "k, v",
    [(1, 3), (5, 15), (1, 19)],
    ids=["rejection", "5shot", "shuffle_whole_class"],
)
def test_labels_follow_the_sampled_class_order(k, v):
    classes = make_classes(UNEQUAL)
    table = lookup_table(classes)
    sampler = sampler_for(classes, n=5, k=k, v=v, b=8)
    for step in range(5):
        batch = sampler.sample(step)
        sampled_classes, rows = sampler.sample_indices(step)
        support = find(table, batch.tr_input)  # [B, N, K, 2]
        query = find(table, batch.val_input)  # [B, N, V, 2]
        for b in range(8):
            # Row n holds one class, which is the n-th sampled class.
            for n in range(5):
                assert set(support[b, n, :, 0]) == {sampled_classes[b, n]}
                assert set(query[b, n, :, 0]) == {sampled_classes[b, n]}
            assert len(set(sampled_classes[b])) == 5  # distinct classes
        expected_labels = np.arange(5)[None, :, None, None]
        np.testing.assert_array_equal(
            batch.tr_output, np.broadcast_to(expected_labels, (8, 5, k, 1))
        )
        np.testing.assert_array_equal(
            batch.val_output, np.broadcast_to(expected_labels, (8, 5, v, 1))
        )
        # The index view agrees with the arrays.
        np.testing.assert_array_equal(
            sampler.normalized_embeddings[rows[..., :k]], batch.tr_input
        )


@pytest.mark.parametrize("k, v", [(1, 15), (1, 19), (5, 15)])
def test_examples_within_a_class_are_distinct(k, v):
    classes = make_classes(UNEQUAL)
    table = lookup_table(classes)
    sampler = sampler_for(classes, n=5, k=k, v=v, b=16)
    for step in range(4):
        batch = sampler.sample(step)
        both = np.concatenate(
            [find(table, batch.tr_input), find(table, batch.val_input)], axis=2
        )
        for b in range(16):
            for n in range(5):
                examples = both[b, n, :, 1]
                assert len(set(examples)) == k + v
                count = UNEQUAL[both[b, n, 0, 0]]
                assert examples.max() < count


def test_takes_all_examples_of_the_smallest_class():
    # V = smallest class - K: the smallest classes are used whole.
    classes = make_classes([6, 6, 9, 12])
    table = lookup_table(classes)
    sampler = sampler_for(classes, n=4, k=1, v=5, b=3)
    batch = sampler.sample(0)
    both = np.concatenate(
        [find(table, batch.tr_input), find(table, batch.val_input)], axis=2
    )
    for b in range(3):
        assert sorted(both[b, :, 0, 0]) == [0, 1, 2, 3]
        for n in range(4):
            if both[b, n, 0, 0] in (0, 1):  # the classes of 6
                assert sorted(both[b, n, :, 1]) == list(range(6))


# ---------------------------------------------------------------------------
# Determinism: a pure function of (seed, stream, step).


def test_same_seed_stream_and_step_give_identical_batches():
    classes = make_classes(UNEQUAL)
    first = sampler_for(classes, seed=7, stream=2).sample(11)
    again = sampler_for(classes, seed=7, stream=2).sample(11)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # Order of calls does not matter: the step is the only state.
    sampler = sampler_for(classes, seed=7, stream=2)
    sampler.sample(3)
    sampler.sample(50)
    for a, b in zip(first, sampler.sample(11)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change", ["seed", "stream", "step"])
def test_different_seed_stream_or_step_give_different_batches(change):
    classes = make_classes(UNEQUAL)
    args = dict(seed=1, stream=0)
    step = 5
    base = sampler_for(classes, **args).sample(step)
    if change == "step":
        step += 1
    else:
        args[change] += 1
    other = sampler_for(classes, **args).sample(step)
    assert not np.array_equal(base.tr_input, other.tr_input)
    assert not np.array_equal(base.val_input, other.val_input)


def test_rejects_bad_arguments():
    classes = make_classes(UNEQUAL)
    with pytest.raises(ValueError, match="batch_size"):
        sampler_for(classes, b=0)
    with pytest.raises(ValueError, match="seed"):
        sampler_for(classes, seed=-1)
    with pytest.raises(ValueError, match="step"):
        sampler_for(classes).sample(-3)


def test_validates_the_split_against_the_episode_shape():
    with pytest.raises(DataError, match="at least 5 classes.*found 4"):
        sampler_for(make_classes([30] * 4), n=5)
    with pytest.raises(DataError, match="class 'c03' has 12"):
        sampler_for(make_classes([30, 30, 30, 12, 30, 30]), k=1, v=15)


# ---------------------------------------------------------------------------
# Statistics.


def chi_square(counts):
    counts = np.asarray(counts, dtype=np.float64)
    expected = counts.sum() / counts.size
    return ((counts - expected) ** 2 / expected).sum()


# Upper 0.1% points of the chi-square distribution (from tables), so a fair
# sampler fails each check with probability 0.001; the seeds are fixed, so
# the outcome is reproducible.
CHI2_999 = {9: 27.88, 19: 43.82, 4: 18.47}


@pytest.mark.parametrize("k, v", [(1, 15), (1, 19)], ids=["rejection", "shuffle"])
def test_classes_examples_and_label_positions_are_uniform(k, v):
    classes = make_classes(UNEQUAL)
    sampler = sampler_for(classes, n=5, k=k, v=v, b=100)
    class_counts = np.zeros(10)
    position_of_class0 = np.zeros(5)
    support_of_class0 = np.zeros(UNEQUAL[0])
    for step in range(40):
        sampled, rows = sampler.sample_indices(step)
        class_counts += np.bincount(sampled.ravel(), minlength=10)
        b_idx, n_idx = np.nonzero(sampled == 0)
        position_of_class0 += np.bincount(n_idx, minlength=5)
        support_of_class0 += np.bincount(rows[b_idx, n_idx, 0], minlength=UNEQUAL[0])
    assert class_counts.sum() == 40 * 100 * 5
    assert chi_square(class_counts) < CHI2_999[9]
    assert chi_square(position_of_class0) < CHI2_999[4]
    assert chi_square(support_of_class0) < CHI2_999[19]


def test_chi_square_check_detects_a_biased_sampler():
    # The bound above is not vacuous: a 20% excess on one class fails it.
    counts = np.full(10, 2000.0)
    counts[3] *= 1.2
    assert chi_square(counts) > CHI2_999[9]


# ---------------------------------------------------------------------------
# Evaluation V.


def test_eval_num_val_examples():
    mini_like = make_classes([600] * 6)
    assert episodes.eval_num_val_examples(mini_like, 1) == 599
    assert episodes.eval_num_val_examples(mini_like, 5) == 595
    tiered_like = make_classes([700, 1300, 732])
    assert episodes.eval_num_val_examples(tiered_like, 1) == 599
    small = make_classes(UNEQUAL)
    assert episodes.eval_num_val_examples(small, 5) == 15
    with pytest.raises(DataError) as error:
        episodes.eval_num_val_examples(small, 20)
    assert str(error.value) == (
        "mem.pkl: expected more than 20 examples in every class, to leave query "
        "examples after 20 support examples, found class 'c00' with 20"
    )


def test_eval_sampler_uses_every_remaining_example():
    classes = make_classes([30, 40, 35, 50, 30, 33])
    v = episodes.eval_num_val_examples(classes, 1)
    assert v == 29
    sampler = sampler_for(classes, n=5, k=1, v=v, b=2)
    assert sampler.sample(0).val_input.shape == (2, 5, 29, 8)


# ---------------------------------------------------------------------------
# tf.data.


def test_dataset_yields_the_sampler_batches_from_first_step():
    sampler = sampler_for(make_classes(UNEQUAL), n=5, k=2, v=4, b=3)
    dataset = episodes.make_dataset(sampler, first_step=7, num_steps=6)
    spec = dataset.element_spec
    assert spec[0] == tf.TensorSpec([], tf.int64)
    assert spec[1] == sampler.element_spec
    steps = []
    for step, batch in dataset:
        steps.append(int(step))
        expected = sampler.sample(int(step))
        for tensor, array in zip(batch, expected):
            np.testing.assert_array_equal(tensor.numpy(), array)
    assert steps == list(range(7, 13))


def test_endless_dataset_restarts_and_matches_the_sampler():
    sampler = sampler_for(make_classes(UNEQUAL), b=2)
    dataset = episodes.make_dataset(sampler, first_step=100)
    for _ in range(2):  # a second pass starts again at first_step
        for step, batch in dataset.take(4):
            np.testing.assert_array_equal(
                batch.val_input.numpy(), sampler.sample(int(step)).val_input
            )
        assert int(step) == 103


def test_dataset_in_a_tf_function():
    sampler = sampler_for(make_classes(UNEQUAL), b=2)
    iterator = iter(episodes.make_dataset(sampler, first_step=0))

    @tf.function
    def step_fn(it):
        step, batch = next(it)
        return step, tf.reduce_sum(batch.val_input)

    for expected_step in range(3):
        step, total = step_fn(iterator)
        assert int(step) == expected_step
        np.testing.assert_allclose(
            total.numpy(), sampler.sample(expected_step).val_input.sum(), rtol=1e-5
        )


def test_dataset_batches_are_bit_identical_to_the_sampler_for_training_shapes():
    # miniImageNet-like 5-way 5-shot, V=15: the TensorFlow gather of the
    # sampled rows gives exactly sample(step), element for element.
    rng = np.random.default_rng(3)
    classes = embeddings.ClassEmbeddings(
        source="mem.pkl",
        embeddings={f"c{i:02d}": rng.random((40, 24)) for i in range(12)},
    )
    sampler = sampler_for(classes, n=5, k=5, v=15, b=6, seed=9, stream=1)
    for step, batch in episodes.make_dataset(sampler, first_step=3, num_steps=2):
        expected = sampler.sample(int(step))
        for tensor, array in zip(batch, expected):
            assert tensor.dtype.as_numpy_dtype == array.dtype
            np.testing.assert_array_equal(tensor.numpy(), array)


def test_embeddings_tensor_shares_the_samplers_memory():
    # One copy of the split: a tieredImageNet training split is 1.2 GB.
    sampler = sampler_for(make_classes(UNEQUAL))
    tensor = sampler.embeddings_tensor
    assert tensor is sampler.embeddings_tensor  # made once
    np.testing.assert_array_equal(tensor.numpy(), sampler.normalized_embeddings)
    sampler.normalized_embeddings[0, 0] = 7.0
    assert tensor[0, 0].numpy() == 7.0


class RecordingSampler(episodes.EpisodeSampler):
    """Records the steps whose indices it samples, in any thread."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampled = []

    def sample_indices(self, step):
        self.sampled.append(step)
        return super().sample_indices(step)


def recording_sampler():
    return RecordingSampler(
        make_classes(UNEQUAL),
        num_classes=5,
        num_tr_examples_per_class=1,
        num_val_examples_per_class=3,
        batch_size=2,
        seed=0,
    )


def test_python_runs_only_when_a_batch_is_asked_for():
    # tf.data worker threads that call into Python while the interpreter
    # shuts down can deadlock the exit (seen here with a prefetching,
    # parallelised map). The dataset therefore calls Python only inside the
    # consumer's own request, never ahead of it: after three batches and a
    # pause, exactly three calls.
    sampler = recording_sampler()
    iterator = iter(episodes.make_dataset(sampler, first_step=4))
    for _ in range(3):
        next(iterator)
    time.sleep(1.0)
    assert sampler.sampled == [4, 5, 6]


@pytest.mark.slow
def test_process_exits_while_a_batch_is_being_sampled():
    # A program that ends with a live iterator over the dataset exits: the
    # dataset never calls Python from a tf.data thread of its own.
    script = textwrap.dedent("""
        import time
        import numpy as np
        from leo_tf.data import embeddings, episodes

        class Slow(episodes.EpisodeSampler):
            def sample_indices(self, step):
                time.sleep(0.5)
                return super().sample_indices(step)

        rng = np.random.default_rng(0)
        classes = embeddings.ClassEmbeddings("mem", {
            f"c{i}": rng.standard_normal((40, 64)) for i in range(10)})
        sampler = Slow(
            classes, num_classes=5, num_tr_examples_per_class=1,
            num_val_examples_per_class=15, batch_size=12, seed=0)
        ITERATOR = iter(episodes.make_dataset(sampler, first_step=0))
        next(ITERATOR)
        print("done", flush=True)
    """)
    result = run_fixtures.run_python(script, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done" in result.stdout
