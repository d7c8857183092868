"""Training summaries for TensorBoard and the console progress lines.

TensorBoard (under --checkpoint_path), every summary_steps: the means over
the window of the step metrics (train/loss, train/query_loss, train/accuracy,
train/kl, train/encoder_penalty, train/l2_penalty, train/orthogonality_penalty,
train/gradient_norm), train/nan_guard_count (cumulative), the mean inner and
finetuning learning rates, train/steps_per_second, and histograms of the
latent codes and of both learning-rate vectors. Meta-validation adds
validation/accuracy and validation/loss.

An evaluation longer than ten seconds prints its own progress line
(`EpisodeProgress`).
"""

import math
import time

import tensorflow as tf

# TrainMetrics field -> TensorBoard tag under train/.
SUMMARY_NAMES = {
    "loss": "loss",
    "query_loss": "query_loss",
    "accuracy": "accuracy",
    "kl": "kl",
    "encoder_penalty": "encoder_penalty",
    "l2": "l2_penalty",
    "orthogonality": "orthogonality_penalty",
    "gradient_norm": "gradient_norm",
}


class TrainingLog:
    """Running means of the step metrics, summaries and the progress line.

    Steps/s (and the ETA from it) counts the time since the window started
    or `restart_clock` was last called: the trainer restarts it after the
    first step's tracing and after each checkpoint's meta-validation, so
    neither is counted.
    """

    _SCALARS = tuple(SUMMARY_NAMES)

    def __init__(self, writer, model, first_step, num_steps_limit, verbose=True):
        """writer: tf.summary writer; verbose: print the progress line."""
        self.writer = writer
        self.model = model
        self.limit = num_steps_limit
        self.verbose = verbose
        self.nan_guard_count = 0
        self._reset(first_step)

    def _reset(self, step):
        self.sums = {name: 0.0 for name in self._SCALARS}
        self.counts = {name: 0 for name in self._SCALARS}
        self.window_start = (step, time.perf_counter())

    def restart_clock(self, step):
        self.window_start = (step, time.perf_counter())

    def add(self, metrics):
        values = {name: float(getattr(metrics, name)) for name in self._SCALARS}
        for name, value in values.items():
            if math.isfinite(value):
                self.sums[name] += value
                self.counts[name] += 1
        self.nan_guard_count += int(metrics.nan_guard)
        self.last_latents = metrics.latents

    def write(self, step):
        """Writes the window's summaries and prints the progress line."""
        first_step, started = self.window_start
        elapsed = time.perf_counter() - started
        steps_per_second = (step - first_step) / elapsed if elapsed > 0 else 0.0
        means = {
            name: self.sums[name] / self.counts[name] if self.counts[name] else math.nan
            for name in self._SCALARS
        }
        model = self.model
        with self.writer.as_default(step=step):
            for name, value in means.items():
                tf.summary.scalar(f"train/{SUMMARY_NAMES[name]}", value)
            tf.summary.scalar("train/nan_guard_count", self.nan_guard_count)
            tf.summary.scalar(
                "train/inner_lr_mean", tf.reduce_mean(model.inner_lr.value)
            )
            tf.summary.scalar(
                "train/finetuning_lr_mean", tf.reduce_mean(model.finetuning_lr.value)
            )
            tf.summary.scalar("train/steps_per_second", steps_per_second)
            tf.summary.histogram("train/latents", self.last_latents)
            tf.summary.histogram("train/inner_lr", model.inner_lr.value)
            tf.summary.histogram("train/finetuning_lr", model.finetuning_lr.value)
        eta = (self.limit - step) / steps_per_second if steps_per_second else math.nan
        self._reset(step)
        if not self.verbose:
            return
        print(
            f"step {step}/{self.limit} | loss {means['loss']:.4f} | "
            f"acc {means['accuracy']:.3f} | {steps_per_second:.1f} steps/s | "
            f"ETA {duration(eta)}"
            + (f" | NaN guard x{self.nan_guard_count}" if self.nan_guard_count else ""),
            flush=True,
        )


class EpisodeProgress:
    """The progress line of a long evaluation, printed at most every `interval` s.

    `meta-test 4000/10000 episodes | 950.2 episodes/s | ETA 0m06s` (`unit`
    names what is counted); the rate counts from the first update (its batch
    includes the tracing), so an evaluation shorter than `interval` prints
    nothing.
    """

    def __init__(self, label, num_episodes, interval=10.0, unit="episodes"):
        self.label = label
        self.num_episodes = num_episodes
        self.interval = interval
        self.unit = unit
        self._start = None
        self._printed_at = None

    def update(self, done):
        """Records that `done` episodes are evaluated; prints if it is time."""
        now = time.perf_counter()
        if self._start is None:
            self._start, self._printed_at = (done, now), now
            return
        if now - self._printed_at < self.interval or done >= self.num_episodes:
            return
        first_done, started = self._start
        rate = (done - first_done) / (now - started) if now > started else math.nan
        eta = (self.num_episodes - done) / rate if rate > 0 else math.nan
        self._printed_at = now
        print(
            f"{self.label} {done}/{self.num_episodes} {self.unit} | "
            f"{rate:.1f} {self.unit}/s | ETA {duration(eta)}",
            flush=True,
        )


def duration(seconds):
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
