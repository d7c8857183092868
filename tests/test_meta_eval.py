"""meta_eval.MetaEvaluator against LEO.run_episodes and the NumPy baseline."""

import types

import numpy as np
import pytest
import tensorflow as tf

from leo_tf import meta_eval
from leo_tf.data import embeddings, episodes
from tests import model_fixtures as fx

DIM = 16
EQUAL_SIZES = (8,) * 6
UNEQUAL_SIZES = (7, 9, 8, 12, 10, 7)


def _sampler(sizes, shots, queries=4, batch_size=6, seed=1, vectors=None):
    rng = np.random.default_rng(0)
    classes = embeddings.ClassEmbeddings(
        source="test",
        embeddings={
            f"c{c}": (
                rng.standard_normal((size, DIM)).astype(np.float32)
                if vectors is None
                else np.tile(vectors[c], (size, 1))
            )
            for c, size in enumerate(sizes)
        },
    )
    return episodes.EpisodeSampler(
        classes,
        num_classes=3,
        num_tr_examples_per_class=shots,
        num_val_examples_per_class=queries,
        batch_size=batch_size,
        seed=seed,
    )


def _model():
    # Large enough learning rates that the adapted weights tell the classes
    # apart, so that accuracies vary from query to query.
    return fx.small_model(fx.small_config(finetuning_lr_init=1.0), dim=DIM, seed=0)


def _reference(model, sampler, first_batch, num_batches):
    """Per-episode (accuracy, loss, baseline accuracy) of the materialised
    episodes: LEO.run_episodes and an independent cosine NCM."""
    results = []
    for step in range(first_batch, first_batch + num_batches):
        batch = sampler.sample(step)
        outputs = model.run_episodes(episodes.Episodes(*map(tf.constant, batch)))
        results.append(
            (
                outputs.accuracy.numpy(),
                outputs.query_loss.numpy(),
                _cosine_nearest_class_mean_accuracy(batch),
            )
        )
    return [np.concatenate(values) for values in zip(*results)]


def _cosine_nearest_class_mean_accuracy(batch):
    """[B] accuracy: argmax over classes of cos(query, mean support), in
    float64; equal cosines go to the lowest label."""
    means = batch.tr_input.astype(np.float64).mean(axis=2)  # [B, N, D]
    queries = batch.val_input.astype(np.float64)  # [B, N, V, D]
    cosine = np.einsum("bnvd,bmd->bnvm", queries, means) / (
        np.linalg.norm(queries, axis=-1)[..., None]
        * np.linalg.norm(means, axis=-1)[:, None, None, :]
    )
    correct = cosine.argmax(axis=-1) == batch.val_output[..., 0]
    return correct.mean(axis=(1, 2))


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "gathered"])
@pytest.mark.parametrize(
    "sizes", [EQUAL_SIZES, UNEQUAL_SIZES], ids=["equal", "unequal"]
)
@pytest.mark.parametrize("shots", [1, 3])
def test_equals_run_episodes_and_numpy_baseline_on_the_same_episodes(
    shots, sizes, grouped
):
    sampler = _sampler(sizes, shots)
    model = _model()
    evaluator = meta_eval.MetaEvaluator(model, sampler, num_towers=2, grouped=grouped)
    results = evaluator.evaluate(2, 3)
    accuracy, loss, baseline_accuracy = _reference(model, sampler, 2, 3)
    assert results.accuracy.shape == (18,)
    # Not a degenerate model: predictions vary between episodes.
    assert len(set(accuracy.round(4))) > 3
    np.testing.assert_array_equal(results.accuracy, accuracy)
    np.testing.assert_allclose(results.query_loss, loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results.baseline_accuracy, baseline_accuracy, atol=1e-7)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "gathered"])
def test_without_the_baseline_scores_leo_alone_with_equal_results(grouped):
    sampler = _sampler(UNEQUAL_SIZES, 1)
    model = _model()
    evaluator = meta_eval.MetaEvaluator(
        model, sampler, with_baseline=False, num_towers=2, grouped=grouped
    )
    results = evaluator.evaluate(1, 2)
    accuracy, loss, _ = _reference(model, sampler, 1, 2)
    assert results.baseline_accuracy is None
    np.testing.assert_array_equal(results.accuracy, accuracy)
    np.testing.assert_allclose(results.query_loss, loss, rtol=1e-5, atol=1e-6)
    _, prototypes, *_ = evaluator.batch_inputs(1)
    assert prototypes.size == 0  # no prototypes made or multiplied
    first = evaluator.evaluate_episodes(4)
    assert first.baseline_accuracy is None and len(first.accuracy) == 4


def test_results_do_not_depend_on_how_batches_are_split_or_towers():
    sampler = _sampler(UNEQUAL_SIZES, 1)
    model = _model()
    whole = meta_eval.MetaEvaluator(model, sampler, num_towers=1).evaluate(0, 4)
    towers = meta_eval.MetaEvaluator(model, sampler, num_towers=3)
    parts = [towers.evaluate(0, 1), towers.evaluate(1, 3)]
    for field, values in zip(whole._fields, whole):
        split = np.concatenate([getattr(part, field) for part in parts])
        np.testing.assert_allclose(split, values, rtol=1e-6, err_msg=field)
    # Batch 1 alone equals the second batch of the whole.
    single = towers.evaluate(1, 1)
    np.testing.assert_array_equal(single.accuracy, whole.accuracy[6:12])
    assert towers._step.experimental_get_tracing_count() == 1


def test_evaluate_episodes_gives_exactly_the_asked_number_of_episodes():
    """Fewer than a batch of 6, or one and a third: the first episodes of the
    whole batches, the rest of the last batch dropped."""
    evaluator = meta_eval.MetaEvaluator(_model(), _sampler(UNEQUAL_SIZES, 1))
    whole = evaluator.evaluate(0, 2)
    for count in (4, 8):
        asked = evaluator.evaluate_episodes(count)
        for field, values in zip(whole._fields, whole):
            assert len(getattr(asked, field)) == count
            np.testing.assert_array_equal(getattr(asked, field), values[:count])


def test_after_batch_hears_the_episodes_done_and_can_end_the_evaluation():
    """Batches of 6: 13 episodes report 6, 12, 13; an exception raised after
    the second batch ends it there, the third never evaluated."""
    evaluator = meta_eval.MetaEvaluator(_model(), _sampler(UNEQUAL_SIZES, 1))
    heard = []
    evaluator.evaluate_episodes(13, heard.append)
    assert heard == [6, 12, 13]

    class Enough(Exception):
        pass

    def stop_after_twelve(done):
        heard.append(done)
        if done == 12:
            raise Enough

    evaluated = []
    evaluate_batch = evaluator.evaluate_batch

    def recorded_batch(step):
        evaluated.append(step)
        return evaluate_batch(step)

    evaluator.evaluate_batch = recorded_batch
    heard.clear()
    with pytest.raises(Enough):
        evaluator.evaluate_episodes(13, stop_after_twelve)
    assert heard == [6, 12] and evaluated == [0, 1]


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "gathered"])
def test_ties_go_to_the_first_label_as_in_run_episodes(grouped):
    # Classes 0 and 1 are the same vector, as are 2 and 3: every example
    # ties with its twin class in the baseline. LEO with zero class weights
    # scores every class 0: argmax is always label 0, the loss log 3.
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((5, DIM)).astype(np.float32)
    vectors[1], vectors[3] = vectors[0], vectors[2]
    sampler = _sampler((6,) * 5, 1, queries=3, vectors=vectors)
    model = _model()
    model.decoder.kernel.assign(tf.zeros_like(model.decoder.kernel))
    model.finetuning_lr.assign(tf.zeros_like(model.finetuning_lr))
    results = meta_eval.MetaEvaluator(model, sampler, grouped=grouped).evaluate(0, 2)
    accuracy, loss, baseline_accuracy = _reference(model, sampler, 0, 2)
    np.testing.assert_array_equal(results.accuracy, np.full(12, 1 / 3, np.float32))
    np.testing.assert_array_equal(results.accuracy, accuracy)
    np.testing.assert_allclose(results.query_loss, np.log(3), rtol=1e-6)
    np.testing.assert_allclose(results.baseline_accuracy, baseline_accuracy, atol=1e-7)
    # Some episode holds both twins, and loses the later one's queries.
    assert baseline_accuracy.min() < 1


def test_equal_logits_go_to_the_lowest_label():
    # One pair, 2-way, labelled 1; three examples. Columns 0-1: LEO's logits,
    # 2-3: the baseline's (dot products with the prototypes).
    logits = np.array(
        [[[2.0, 1.0, 3.0], [2.0, 0.0, 3.0], [1.0, 5.0, 3.0], [2.0, 4.0, 3.0]]],
        np.float32,
    )  # [P=1, 2N=4, S=3]
    scores = meta_eval._pair_scores(tf.constant(logits), tf.constant([1]), 2)
    scores = scores.numpy()
    # LEO: [2, 2] ties (label 0 wins: wrong), 1 > 0 (wrong), 3 = 3 (wrong);
    # baseline: 1 < 2 (right), 5 > 4 (wrong), 3 = 3 (wrong).
    np.testing.assert_array_equal(scores[0, :, 0], [0, 0, 0])
    np.testing.assert_array_equal(scores[0, :, 2], [1, 0, 0])
    leo = logits[0, :2].astype(np.float64)  # [N, S]
    expected_loss = np.log(np.exp(leo).sum(axis=0)) - leo[1]
    np.testing.assert_allclose(scores[0, :, 1], expected_loss, rtol=1e-6)
    # LEO's logits alone: its two scores, the same.
    alone = meta_eval._pair_scores(tf.constant(logits[:, :2]), tf.constant([1]), 1)
    np.testing.assert_array_equal(alone.numpy(), scores[..., :2])


def test_prefers_grouped_scoring_for_all_remaining_queries_only():
    def sampler(num_val, num_classes=5, class_size=600, split_classes=20, dim=640):
        return types.SimpleNamespace(
            normalized_embeddings=np.empty((split_classes * class_size, 0)),
            class_offsets=np.arange(split_classes) * class_size,
            num_classes=num_classes,
            num_val_examples_per_class=num_val,
            batch_size=200,
            embedding_dim=dim,
        )

    assert meta_eval.prefers_grouped(sampler(599))  # miniImageNet meta-test
    assert not meta_eval.prefers_grouped(sampler(15))
    # Gathering 20-way queries would take 6 GB.
    assert meta_eval.prefers_grouped(sampler(599, num_classes=20))
    # Omniglot's meta-test: 659 small classes, one op each would cost more
    # than copying the (5 MB of) queries.
    omniglot = sampler(19, class_size=20, split_classes=659, dim=64)
    assert not meta_eval.prefers_grouped(omniglot)


def _adaptation_matmuls(batch_size):
    """MatMul ops in the traced adaptation of a batch of batch_size episodes."""
    sampler = _sampler(EQUAL_SIZES, shots=1, batch_size=batch_size)
    evaluator = meta_eval.MetaEvaluator(_model(), sampler, num_towers=2)
    support = evaluator.batch_inputs(0)[0]
    graph = evaluator._adapt.get_concrete_function(tf.constant(support)).graph
    return sum(op.type == "MatMul" for op in graph.get_operations())


def test_adaptation_traces_batched_products_whatever_the_batch_size():
    # Per-episode products would trace ops in proportion to B (thousands at
    # B = 200, seconds of tracing at each evaluator's first batch).
    assert _adaptation_matmuls(4) == _adaptation_matmuls(12)
