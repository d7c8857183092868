"""Time of the paper's full miniImageNet run, extrapolated from a short real run.

    python benchmarks/bench_run.py [--settings 1shot,5shot] [--steps 600]

The paper's protocol per setting is 100,000 meta-training steps, a
meta-validation (10 batches of 200 episodes, V = 600 - K) every 1000 steps,
so 100 of them, then a 10,000-episode meta-test. This benchmark writes
miniImageNet-shaped random embeddings in the authors' pickle format (64 / 16 /
20 classes x 600 examples, D = 640, float32) and runs the real command,

    python -m leo_tf.train --flagfile=flags/miniImageNet_5way<K>shot.cfg
        --data_path=<the random data> --num_steps_limit=<steps>
        --checkpoint_steps=<steps / validations> --summary_steps=<window>
        --evaluate_after_training=true

in a child process, so every part runs through the code paths of a real run:
the trainer's loop with its episode sampling and noise, its meta-validations
(with checkpoints), and the meta-test. The child's output lines are
timestamped here as they arrive:

  start-up     process start to the first progress line (imports, data
               loading and checks, building and tracing, the first window);
  training     seconds per step: the time between consecutive progress lines
               (printed every --window steps), over the windows that hold no
               meta-validation, the first one left out;
  validation   a window that starts at a checkpoint step, less its steps at
               the training rate: the 10 meta-validation batches, the
               checkpoint and, when the accuracy is the best so far, its copy
               to best_checkpoint (random data: a coin flip); the first one
               also traces the evaluation step and is reported apart;
  meta-test    the last progress line to the "Meta-test accuracy" line, less
               one validation (the last step's): the end of training, loading
               the test split and the best checkpoint, tracing, and the
               episodes.

It prints each part, the full run extrapolated as start-up + 100,000 steps +
the first and 99 later validations + meta-test, and the child's peak
resident memory (RSS), and writes them to benchmarks/results/bench_run.json. The data are random, so
accuracies mean nothing; times do not depend on the values. On a shared
machine the parts are measured minutes apart under whatever load there is:
compare figures of one run, or of runs on a quiet machine.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from leo_tf.embedding import writer

REPO = pathlib.Path(__file__).resolve().parents[1]
SPLIT_CLASSES = {"train": 64, "val": 16, "test": 20}
EXAMPLES_PER_CLASS = 600
DIM = 640
PAPER_STEPS = 100_000
PAPER_VALIDATIONS = 100
PAPER_TEST_EPISODES = 10_000
SETTINGS = {"1shot": 1, "5shot": 5}

_PROGRESS = re.compile(r"^step (\d+)/(\d+) \|")
_TEST = re.compile(r"^Meta-test accuracy")


def write_embeddings(data_path, seed=0):
    """Writes random miniImageNet-shaped pickles under data_path/miniImageNet.

    Layout and fields as the authors' archive: `<split>_embeddings.pkl` under
    `miniImageNet/center`, a dict of `embeddings` float32 [n, 640], `keys`
    "miniImageNet-<class>-<class>_<index>.JPEG" and `labels` [n]; classes
    disjoint across splits.
    """
    rng = np.random.default_rng(seed)
    folder = pathlib.Path(data_path) / "miniImageNet" / "center"
    folder.mkdir(parents=True, exist_ok=True)
    first = 0
    for split, num_classes in SPLIT_CLASSES.items():
        class_ids = [f"n{first + c:08d}" for c in range(num_classes)]
        first += num_classes
        writer.write_split(
            str(folder / f"{split}_embeddings.pkl"),
            rng.random((num_classes * EXAMPLES_PER_CLASS, DIM), dtype=np.float32),
            np.array(
                [
                    f"miniImageNet-{c}-{c}_{i:05d}.JPEG"
                    for c in class_ids
                    for i in range(EXAMPLES_PER_CLASS)
                ]
            ),
            np.repeat(np.arange(num_classes), EXAMPLES_PER_CLASS),
        )


def run_training(repo, data_path, run_path, shots, args):
    """Runs leo_tf.train; returns ([(seconds since start, line)], peak RSS MB)."""
    command = [
        sys.executable,
        "-m",
        "leo_tf.train",
        f"--flagfile={repo / 'flags' / f'miniImageNet_5way{shots}shot.cfg'}",
        f"--data_path={data_path}",
        f"--checkpoint_path={run_path}",
        f"--num_steps_limit={args.steps}",
        f"--checkpoint_steps={args.steps // args.validations}",
        f"--summary_steps={args.window}",
        f"--num_metatest_episodes={args.test_episodes}",
        "--evaluate_after_training=true",
    ]
    env = {**os.environ, "PYTHONPATH": str(repo), "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=repo,
    )
    lines = []
    for line in child.stdout:
        lines.append((time.perf_counter() - start, line.rstrip("\n")))
        if args.verbose:
            print("   |", line, end="", flush=True)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        tail = "\n".join(line for _, line in lines[-30:])
        raise RuntimeError(f"leo_tf.train exited {child.returncode}:\n{tail}")
    return lines, usage.ru_maxrss / 1024


def phases(lines, args):
    """The parts of a run from its timestamped lines (see the docstring)."""
    progress = [
        (t, int(m.group(1))) for t, line in lines if (m := _PROGRESS.match(line))
    ]
    tests = [t for t, line in lines if _TEST.match(line)]
    checkpoint_steps = args.steps // args.validations
    if len(progress) < args.steps // args.window or not tests:
        raise RuntimeError(
            "could not find the progress lines 'step N/M |' or the "
            "'Meta-test accuracy' line in the output of leo_tf.train; rerun "
            "with --verbose to see it"
        )
    windows = list(zip(progress, progress[1:]))
    # Windows that start at a checkpoint step hold a meta-validation; the
    # first one follows tracing and warm-up.
    training = [
        (t1 - t0, s1 - s0)
        for (t0, s0), (t1, s1) in windows[1:]
        if s0 % checkpoint_steps
    ]
    step_seconds = sum(t for t, _ in training) / sum(s for _, s in training)
    validations = [
        (t1 - t0) - (s1 - s0) * step_seconds
        for (t0, s0), (t1, s1) in windows
        if s0 % checkpoint_steps == 0
    ]
    steady = float(np.median(validations[1:]))
    return {
        "startup_s": progress[0][0],
        "train_step_ms": 1e3 * step_seconds,
        "train_steps_timed": sum(s for _, s in training),
        "first_validation_s": validations[0],
        "validation_s": steady,
        "validation_s_each": validations,
        # After the last step: its meta-validation (taken as `steady`), then
        # the end of training and the meta-test.
        "metatest_s": tests[-1] - progress[-1][0] - steady,
    }


def extrapolate(parts, test_episodes):
    """Seconds of the paper's full run from the measured parts.

    The first meta-validation also traces the evaluation step: it counts once
    as measured, the other 99 as the later ones.
    """
    training = PAPER_STEPS * parts["train_step_ms"] / 1e3
    validation = (
        parts["first_validation_s"] + (PAPER_VALIDATIONS - 1) * parts["validation_s"]
    )
    test = parts["metatest_s"] * PAPER_TEST_EPISODES / test_episodes
    return {
        "startup_s": parts["startup_s"],
        "training_s": training,
        "validation_s": validation,
        "metatest_s": test,
        "total_s": parts["startup_s"] + training + validation + test,
    }


def report(setting, parts, full, peak_mb):
    def minutes(seconds):
        return f"{seconds / 60:5.1f} min"

    steps_per_second = 1e3 / parts["train_step_ms"]
    return "\n".join(
        [
            f"5-way {setting}:",
            f"  start-up (to the first progress line)   {parts['startup_s']:7.1f} s",
            f"  training                                {parts['train_step_ms']:7.2f} "
            f"ms/step ({steps_per_second:.1f} steps/s, "
            f"{parts['train_steps_timed']} steps timed)",
            f"  one meta-validation (10 x 200 episodes) {parts['validation_s']:7.2f} s "
            f"(median of the later ones; each: "
            f"{', '.join(f'{s:.2f}' for s in parts['validation_s_each'])})",
            f"  the first, with tracing                 "
            f"{parts['first_validation_s']:7.2f} s",
            f"  meta-test ({parts['test_episodes']} episodes)"
            f"{'':{max(0, 19 - len(str(parts['test_episodes'])))}}"
            f"{parts['metatest_s']:7.1f} s",
            f"  peak RSS of the run                     {peak_mb:7.0f} MB",
            "  full paper run, extrapolated:",
            f"    {PAPER_STEPS} steps                       {minutes(full['training_s'])}",
            f"    {PAPER_VALIDATIONS} meta-validations               "
            f"{minutes(full['validation_s'])}",
            f"    meta-test of {PAPER_TEST_EPISODES} episodes         "
            f"{minutes(full['metatest_s'])}",
            f"    start-up                           {minutes(full['startup_s'])}",
            f"    total                              {minutes(full['total_s'])}",
        ]
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument(
        "--steps", type=int, default=600, help="meta-training steps of the short run"
    )
    parser.add_argument(
        "--validations",
        type=int,
        default=4,
        help="meta-validations in the short run (evenly spaced; the last at the "
        "last step; at least 3: the first traces the evaluation step)",
    )
    parser.add_argument(
        "--window", type=int, default=50, help="steps per progress line (timed window)"
    )
    parser.add_argument(
        "--test_episodes",
        type=int,
        default=PAPER_TEST_EPISODES,
        help="meta-test episodes; fewer than 10,000 are scaled up in the "
        "extrapolation, fixed costs (loading, tracing) included, an over-estimate",
    )
    parser.add_argument(
        "--repo",
        default=str(REPO),
        help="the checkout whose leo_tf and flags run (to compare versions)",
    )
    parser.add_argument(
        "--data_path",
        default="",
        help="where to write the random embeddings (default: a temporary "
        "folder, removed afterwards)",
    )
    parser.add_argument("--verbose", action="store_true", help="echo the run's output")
    parser.add_argument(
        "--json", default=str(REPO / "benchmarks" / "results" / "bench_run.json")
    )
    args = parser.parse_args()
    checkpoint_steps = args.steps // max(args.validations, 1)
    if (
        args.validations < 3
        or args.steps % args.validations
        or checkpoint_steps % args.window
        or checkpoint_steps // args.window < 3
    ):
        parser.error(
            "--steps must be a multiple of --validations (>= 3), and the steps "
            "between validations a multiple of --window, at least 3 windows"
        )
    repo = pathlib.Path(args.repo).resolve()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_run_") as scratch:
        data_path = pathlib.Path(args.data_path or scratch) / "data"
        if not (data_path / "miniImageNet" / "center" / "test_embeddings.pkl").exists():
            started = time.perf_counter()
            write_embeddings(data_path)
            print(
                f"random miniImageNet-shaped embeddings written to {data_path} "
                f"in {time.perf_counter() - started:.1f} s"
            )
        print(
            f"leo_tf from {repo}; {args.steps} steps, {args.validations} "
            f"meta-validations, a {args.test_episodes}-episode meta-test per "
            f"setting; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
            flush=True,
        )
        for setting in args.settings.split(","):
            shots = SETTINGS[setting]
            lines, peak_mb = run_training(
                repo, data_path, pathlib.Path(scratch) / f"run_{setting}", shots, args
            )
            parts = {**phases(lines, args), "test_episodes": args.test_episodes}
            full = extrapolate(parts, args.test_episodes)
            print(report(setting, parts, full, peak_mb), flush=True)
            results.append(
                {
                    "setting": f"5-way {setting}",
                    "parts": parts,
                    "full_run_extrapolated": full,
                    "peak_rss_mb": peak_mb,
                    "load_average_after": os.getloadavg()[0],
                }
            )
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {"repo": str(repo), "args": vars(args), "results": results}, indent=2
        )
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
