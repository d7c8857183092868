"""The training log: window means in TensorBoard, the progress line."""

import math

import numpy as np
import pytest
import tensorflow as tf

from leo_tf import progress
from leo_tf.steps import TrainMetrics
from tests import model_fixtures as fx

LIMIT = 100


def _metrics(rng, nan_guard=False, **values):
    """TrainMetrics of random scalars, `values` overriding some fields."""
    scalars = {name: float(rng.uniform(0.1, 2.0)) for name in progress.SUMMARY_NAMES}
    scalars.update(values)
    return TrainMetrics(
        **{name: tf.constant(value) for name, value in scalars.items()},
        nan_guard=tf.constant(nan_guard),
        latents=tf.constant(rng.normal(size=(2, 3, 1, 4)), tf.float32),
    )


def _summaries(directory):
    """({tag: {step: value}} of scalars, {tag: steps} of histograms)."""
    scalars, histograms = {}, {}
    for path in directory.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                if plugin == "scalars":
                    number = float(tf.make_ndarray(value.tensor))
                    scalars.setdefault(value.tag, {})[event.step] = number
                elif plugin == "histograms":
                    histograms.setdefault(value.tag, set()).add(event.step)
    return scalars, histograms


class _Clock:
    """A time.perf_counter that advances only when told."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", fake)
    return fake


@pytest.fixture(scope="module")
def model():
    return fx.small_model()


def test_window_means_skip_non_finite_values_and_the_guard_count_accumulates(
    tmp_path, clock, model, capsys
):
    rng = np.random.default_rng(0)
    writer = tf.summary.create_file_writer(str(tmp_path))
    log = progress.TrainingLog(writer, model, first_step=10, num_steps_limit=LIMIT)
    first_window = [
        _metrics(rng),
        _metrics(rng, nan_guard=True, loss=math.nan, kl=math.inf),
        _metrics(rng),
    ]
    second_window = [_metrics(rng, nan_guard=True), _metrics(rng)]
    for metrics in first_window:
        log.add(metrics)
    clock.now += 2.0  # 3 steps in 2 s
    log.write(13)
    for metrics in second_window:
        log.add(metrics)
    clock.now += 4.0  # 2 steps in 4 s
    log.write(15)
    writer.flush()

    scalars, histograms = _summaries(tmp_path)
    for name, tag in progress.SUMMARY_NAMES.items():
        for step, window in ((13, first_window), (15, second_window)):
            values = [float(getattr(m, name)) for m in window]
            expected = np.mean([v for v in values if math.isfinite(v)])
            assert scalars[f"train/{tag}"][step] == pytest.approx(expected), tag
    assert scalars["train/nan_guard_count"] == {13: 1.0, 15: 2.0}
    assert scalars["train/steps_per_second"] == {
        13: pytest.approx(1.5),
        15: pytest.approx(0.5),
    }
    assert scalars["train/inner_lr_mean"][13] == pytest.approx(
        float(np.mean(model.inner_lr.numpy()))
    )
    assert scalars["train/finetuning_lr_mean"][15] == pytest.approx(
        float(np.mean(model.finetuning_lr.numpy()))
    )
    for tag in ("train/latents", "train/inner_lr", "train/finetuning_lr"):
        assert histograms[tag] == {13, 15}
    lines = capsys.readouterr().out.splitlines()
    loss_13 = np.mean([float(first_window[i].loss) for i in (0, 2)])
    accuracy_15 = np.mean([float(m.accuracy) for m in second_window])
    # 87 steps left at 1.5 steps/s: 58 s; 85 at 0.5 steps/s: 170 s.
    assert lines == [
        f"step 13/{LIMIT} | loss {loss_13:.4f} | acc "
        f"{np.mean([float(m.accuracy) for m in first_window]):.3f} | "
        "1.5 steps/s | ETA 0m58s | NaN guard x1",
        f"step 15/{LIMIT} | loss "
        f"{np.mean([float(m.loss) for m in second_window]):.4f} | acc "
        f"{accuracy_15:.3f} | 0.5 steps/s | ETA 2m50s | NaN guard x2",
    ]


def test_a_window_of_non_finite_values_has_a_nan_mean(tmp_path, clock, model):
    rng = np.random.default_rng(1)
    writer = tf.summary.create_file_writer(str(tmp_path))
    log = progress.TrainingLog(writer, model, 0, LIMIT, verbose=False)
    log.add(_metrics(rng, loss=math.nan))
    clock.now += 1.0
    log.write(1)
    writer.flush()
    scalars, _ = _summaries(tmp_path)
    assert math.isnan(scalars["train/loss"][1])
    assert math.isfinite(scalars["train/accuracy"][1])


def test_restarting_the_clock_leaves_the_time_before_out(tmp_path, clock, model):
    """Tracing the first step is not counted in steps/s."""
    rng = np.random.default_rng(2)
    writer = tf.summary.create_file_writer(str(tmp_path))
    log = progress.TrainingLog(writer, model, 0, LIMIT, verbose=False)
    log.add(_metrics(rng))
    clock.now += 30.0  # the first step, with its tracing
    log.restart_clock(1)
    for _ in range(4):
        log.add(_metrics(rng))
    clock.now += 2.0
    log.write(5)
    writer.flush()
    scalars, _ = _summaries(tmp_path)
    assert scalars["train/steps_per_second"][5] == pytest.approx(2.0)


def test_training_speed_leaves_meta_validation_out(
    toy_data, tmp_path, clock, monkeypatch, capsys
):
    """Each step takes 0.01 s of the fake clock, each meta-validation 1000 s:
    every progress line, after a checkpoint too, says 100 steps/s."""
    from leo_tf import trainer  # pylint: disable=g-import-not-at-top
    from tests import run_fixtures  # pylint: disable=g-import-not-at-top

    add, estimate = progress.TrainingLog.add, trainer._Validation.estimate

    def timed_add(self, metrics):
        clock.now += 0.01
        add(self, metrics)

    def slow_estimate(self, step):
        clock.now += 1000.0
        return estimate(self, step)

    monkeypatch.setattr(progress.TrainingLog, "add", timed_add)
    monkeypatch.setattr(trainer._Validation, "estimate", slow_estimate)
    config = run_fixtures.toy_run_config(
        toy_data, tmp_path / "run", num_steps_limit=30, summary_steps=5
    )
    trainer.train(config)
    speeds = [
        line.split(" | ")[3]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("step ")
    ]
    assert speeds == ["100.0 steps/s"] * 6


def test_quiet_log_prints_nothing(tmp_path, clock, model, capsys):
    writer = tf.summary.create_file_writer(str(tmp_path))
    log = progress.TrainingLog(writer, model, 0, LIMIT, verbose=False)
    log.add(_metrics(np.random.default_rng(3)))
    clock.now += 1.0
    log.write(1)
    assert capsys.readouterr().out == ""


def test_the_episode_progress_line_every_interval_rated_from_the_first_batch(
    clock, capsys
):
    log = progress.EpisodeProgress("meta-test", 10000, interval=10.0)
    clock.now += 30.0  # the first batch, tracing included: not in the rate
    log.update(200)
    clock.now += 9.9
    log.update(400)
    assert capsys.readouterr().out == ""  # not yet 10 s since the first
    clock.now += 0.1
    log.update(600)  # 400 episodes in 10 s since the first batch
    clock.now += 4.0
    log.update(1000)  # 4 s after the last line: none
    clock.now += 6.0
    log.update(1400)  # 1200 in 20 s
    clock.now += 300.0
    log.update(10000)  # the end: the result line follows
    assert capsys.readouterr().out == (
        "meta-test 600/10000 episodes | 40.0 episodes/s | ETA 3m55s\n"
        "meta-test 1400/10000 episodes | 60.0 episodes/s | ETA 2m23s\n"
    )


@pytest.mark.parametrize(
    "seconds,text",
    [
        (0, "0m00s"),
        (59.4, "0m59s"),
        (59.6, "1m00s"),
        (754, "12m34s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (3 * 3600 + 25 * 60 + 59, "3h25m"),
        (math.nan, "?"),
        (math.inf, "?"),
    ],
)
def test_duration(seconds, text):
    assert progress.duration(seconds) == text
