"""The few-shot regression task sampler: the paper's mixture, ranges, noise."""

import numpy as np

from leo_tf.regression import tasks


def _batch(seed=0, stream=tasks.TRAIN_STREAM, index=0, size=8, noise=0.3):
    rng = tasks.task_rng(seed, stream, index)
    return tasks.sample_batch(rng, size, 5, 7, noise)


def test_sinusoids_and_lines_are_drawn_with_equal_probability():
    kinds = tasks.sample_tasks(np.random.default_rng(0), 4000).kind
    sines = int(np.sum(kinds == tasks.SINE))
    assert set(np.unique(kinds)) == {tasks.SINE, tasks.LINE}
    # Binomial(4000, 1/2): stddev sqrt(1000) = 31.6; allow 4.5 of them.
    assert abs(sines - 2000) < 4.5 * np.sqrt(1000)


def test_task_parameters_fill_the_papers_ranges():
    drawn = tasks.sample_tasks(np.random.default_rng(1), 4000)
    for values, (low, high) in [
        (drawn.amplitude, (0.1, 5.0)),
        (drawn.phase, (0.0, np.pi)),
        (drawn.slope, (-3.0, 3.0)),
        (drawn.intercept, (-3.0, 3.0)),
    ]:
        assert values.min() >= low and values.max() <= high
        # Uniform over the whole range: both ends are reached within 1%.
        width = high - low
        assert values.min() < low + 0.01 * width
        assert values.max() > high - 0.01 * width
        assert abs(values.mean() - (low + high) / 2) < 0.03 * width


def test_task_functions_are_the_sinusoid_or_the_line_of_their_parameters():
    drawn = tasks.sample_tasks(np.random.default_rng(2), 6)
    x = np.linspace(-5, 5, 11)[None].repeat(6, axis=0)
    for i in range(6):
        if drawn.kind[i] == tasks.SINE:
            expected = drawn.amplitude[i] * np.sin(x[i] - drawn.phase[i])
        else:
            expected = drawn.slope[i] * x[i] + drawn.intercept[i]
        np.testing.assert_allclose(drawn(x)[i], expected, rtol=1e-12)


def test_batch_shapes_inputs_and_noise():
    drawn, batch = _batch(size=2000, noise=0.3)
    assert batch.support_x.shape == batch.support_y.shape == (2000, 5, 1)
    assert batch.query_x.shape == batch.query_y.shape == (2000, 7, 1)
    assert batch.query_truth.shape == (2000, 7, 1)
    assert all(array.dtype == np.float32 for array in batch)
    inputs = np.concatenate([batch.support_x, batch.query_x], axis=1)[..., 0]
    assert inputs.min() >= -5.0 and inputs.max() <= 5.0
    assert inputs.min() < -4.9 and inputs.max() > 4.9
    truth = drawn(inputs.astype(np.float64))
    np.testing.assert_allclose(batch.query_truth[..., 0], truth[:, 5:], atol=1e-5)
    noise = np.concatenate([batch.support_y, batch.query_y], axis=1)[..., 0] - truth
    # 24000 draws: the sample stddev is within 1.5% of 0.3 with room to spare.
    assert abs(noise.std() - 0.3) < 0.3 * 0.015
    assert abs(noise.mean()) < 0.01


def test_batches_are_a_function_of_seed_stream_and_index():
    first = _batch(seed=3, stream=tasks.TRAIN_STREAM, index=5)[1]
    again = _batch(seed=3, stream=tasks.TRAIN_STREAM, index=5)[1]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    for other in [
        _batch(seed=4, stream=tasks.TRAIN_STREAM, index=5)[1],
        _batch(seed=3, stream=tasks.TEST_STREAM, index=5)[1],
        _batch(seed=3, stream=tasks.TRAIN_STREAM, index=6)[1],
    ]:
        assert not np.array_equal(first.support_x, other.support_x)
