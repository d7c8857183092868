"""Episodes per second and peak memory of LEO steps, three formulations.

    python benchmarks/bench_step.py [--windows 7] [--json PATH]

Each (variant, setting) runs in a fresh process: import, build, trace and
warm up, then the median rate of repeated timed windows, and the process's
peak resident memory (and its growth over the resident memory just before
the first batch existed). The processes of one setting live side by side and
take turns: each timed window of one variant is followed by one of every
other variant (in a rotating order), and only one process runs at a time.
Every variant is thus timed under the same machine conditions, which on a
shared, noisy machine drift by tens of percent within a minute; the ratios
compare like with like. Before each window a process runs a few untimed
steps, so that its input pipeline, idle while the others ran, is back in
its steady state. Variants:

  shipped   leo_tf's compiled steps, fed by its tf.data pipeline (episodes
            and noise drawn ahead of the step); in evaluation, its
            meta-validation loop (meta_eval.MetaEvaluator) as a training
            run uses it: new batches of indices, the split's examples held
            in TensorFlow, LEO alone (the meta-test adds the
            nearest-class-mean baseline);
  map_fn    the literal per-episode formulation of leo_tf/reference.py
            under tf.map_fn, with the same outer update, same pipeline (in
            evaluation, on one materialised batch, reused);
  torch     the equivalent PyTorch eager step of benchmarks/torch_leo.py
            (second order), if torch is installed;
  mirrored  the shipped step under MirroredStrategy over 2 logical CPU
            devices, each replica taking half of the meta-batch (training
            settings only; a CPU cannot show GPU scaling).

Settings: meta-training 12 x 5-way 1-shot and 12 x 5-way 5-shot (V=15);
evaluation 200 x 5-way 1-shot with V=15 and with V=599. Batches come from
an EpisodeSampler over random data: 64 classes x 600 x 640 for training (a
miniImageNet train split), 20 for evaluation (its test split). The map_fn
and PyTorch evaluation variants reuse one sampled batch (sampling 1.5 GB per
step would measure memory bandwidth, not the step).
"""

import argparse
import contextlib
import importlib.util
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = {
    "train_1shot": dict(mode="train", batch=12, shots=1, queries=15),
    "train_5shot": dict(mode="train", batch=12, shots=5, queries=15),
    "eval_v15": dict(mode="eval", batch=200, shots=1, queries=15),
    "eval_v599": dict(mode="eval", batch=200, shots=1, queries=599),
}
SPLIT_CLASSES = {"train": 64, "eval": 20}
VARIANTS = ("shipped", "map_fn", "torch", "mirrored")
NUM_CLASSES, DIM = 5, 640


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb():
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sampler(setting, seed=0):
    import numpy as np

    from leo_tf.data import embeddings, episodes

    rng = np.random.default_rng(seed)
    classes = embeddings.ClassEmbeddings(
        source="random",
        embeddings={
            f"c{c:03d}": rng.standard_normal((600, DIM), dtype=np.float32)
            for c in range(SPLIT_CLASSES[setting["mode"]])
        },
    )
    return episodes.EpisodeSampler(
        classes,
        num_classes=NUM_CLASSES,
        num_tr_examples_per_class=setting["shots"],
        num_val_examples_per_class=setting["queries"],
        batch_size=setting["batch"],
        seed=seed,
    )


def _tf_worker(variant, setting, args):
    # leo_tf before TensorFlow, as its users import it: leo_tf chooses
    # TensorFlow's CPU kernels at import (leo_tf/__init__.py), for every variant.
    from leo_tf import meta_eval, runtime, steps
    from leo_tf.config import ModelConfig, OptimizerConfig
    from leo_tf.data import episodes as episodes_lib
    from leo_tf.model import LEO
    from leo_tf.noise import noise_dataset

    import tensorflow as tf

    runtime.configure_threads()
    strategy = None
    if variant == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    sampler = _sampler(setting)
    model_config = ModelConfig(dropout_rate=0.3)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = LEO(model_config, DIM, seed=0)
        optimizer = steps.make_optimizer(OptimizerConfig())
    if variant == "map_fn":
        from leo_tf.reference import ReferenceModel

        model = ReferenceModel(model)
    spec = sampler.element_spec
    # tf.map_fn is the reference's own parallelism: it runs as one tower.
    towers = 1 if variant == "map_fn" else args.towers
    baseline_rss = _current_rss_mb()
    if setting["mode"] == "train":
        step = steps.compile_train_step(
            model,
            optimizer,
            OptimizerConfig(),
            spec,
            jit_compile=args.jit_compile,
            strategy=strategy,
            num_towers=(
                runtime.num_towers(towers, setting["batch"]) if strategy is None else 1
            ),
        )
        num_steps = 10**6
        dataset = tf.data.Dataset.zip(
            episodes_lib.make_dataset(sampler, 0, num_steps),
            noise_dataset(
                0,
                0,
                num_steps,
                spec.tr_input.shape.as_list(),
                spec.val_input.shape.as_list(),
                model_config,
            ),
        )
        iterator = iter(dataset)

        def run_steps(count):
            for _ in range(count):
                (_, episodes), noise = next(iterator)
                metrics = step(episodes, noise)
            metrics.loss.numpy()

    elif variant == "shipped":
        evaluator = meta_eval.MetaEvaluator(
            model,
            sampler,
            with_baseline=False,
            jit_compile=args.jit_compile,
            num_towers=runtime.num_towers(towers, setting["batch"]),
        )
        batches = iter(range(10**9))

        def run_steps(count):
            for _ in range(count):
                evaluator.evaluate(next(batches), 1)

    else:
        num_towers = runtime.num_towers(towers, setting["batch"])

        def evaluate(episodes):
            with steps.host_products(model):
                parts = steps.run_towers(model, episodes, None, num_towers)
            return (
                tf.concat([part.accuracy for part in parts], 0),
                tf.concat([part.query_loss for part in parts], 0),
            )

        step = tf.function(
            evaluate, input_signature=[spec], jit_compile=args.jit_compile
        )
        # Through the input pipeline, which hands the sampler's (aligned)
        # arrays to TensorFlow without a copy.
        _, episodes = next(iter(episodes_lib.make_dataset(sampler, 0, 1)))

        def run_steps(count):
            for _ in range(count):
                accuracy, _ = step(episodes)
            accuracy.numpy()

    return run_steps, baseline_rss


def _torch_worker(setting, args):
    import numpy as np
    import torch

    # Before TensorFlow (the sampler imports it): torch.optim loads Triton
    # through torch._dynamo, and Triton crashes when loaded after TensorFlow.
    import torch._dynamo  # noqa: F401

    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch_leo
    from leo_tf.config import ModelConfig, OptimizerConfig

    torch.manual_seed(0)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    sampler = _sampler(setting)
    model = torch_leo.TorchLEO(ModelConfig(dropout_rate=0.3), DIM)
    baseline_rss = _current_rss_mb()

    def tensors(batch):
        return (
            torch.from_numpy(batch.tr_input),
            torch.from_numpy(batch.tr_output[..., 0].astype(np.int64)),
            torch.from_numpy(batch.val_input),
            torch.from_numpy(batch.val_output[..., 0].astype(np.int64)),
        )

    if setting["mode"] == "train":
        step = torch_leo.make_train_step(model, OptimizerConfig())
        counter = iter(range(10**9))

        def run_steps(count):
            for _ in range(count):
                step(*tensors(sampler.sample(next(counter))))

    else:
        step = torch_leo.make_eval_step(model)
        batch = tensors(sampler.sample(0))

        def run_steps(count):
            for _ in range(count):
                step(*batch)

    return run_steps, baseline_rss


def worker(args):
    """Builds and warms up a variant, then times one window per request.

    Protocol on stdin/stdout (other output goes to stderr): prints
    `@ready` after warm-up; for each `window` line read, runs the settling
    steps, times one window and prints `@window <steps/s>`; at `done` (or end
    of input) prints `@result <json>`.
    """
    setting = SETTINGS[args.setting]
    if args.variant == "torch":
        run_steps, baseline_rss = _torch_worker(setting, args)
    else:
        run_steps, baseline_rss = _tf_worker(args.variant, setting, args)
    training = setting["mode"] == "train"
    steps_per_window = args.steps or (20 if training else 2)
    # Training is fed by a pipeline that draws 2 steps ahead: 3 untimed steps
    # use up what it drew while this process waited its turn.
    settle_steps = 3 if training else 1
    run_steps(max(3, steps_per_window // 2))  # trace and warm up
    print("@ready", flush=True)
    rates = []
    for line in sys.stdin:
        if line.strip() != "window":
            break
        run_steps(settle_steps)
        start = time.perf_counter()
        run_steps(steps_per_window)
        rates.append(steps_per_window / (time.perf_counter() - start))
        print(f"@window {rates[-1]}", flush=True)
    result = {
        "variant": args.variant + ("+xla" if args.jit_compile else ""),
        "setting": args.setting,
        "episodes_per_second": statistics.median(rates) * setting["batch"],
        "window_episodes_per_second": [r * setting["batch"] for r in rates],
        "peak_rss_mb": _peak_rss_mb(),
        "peak_growth_mb": _peak_rss_mb() - baseline_rss,
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
    }
    print("@result " + json.dumps(result), flush=True)


class _Worker:
    """One variant's worker process, driven window by window."""

    def __init__(self, variant, setting, args, jit_compile=False):
        self.variant = variant + ("+xla" if jit_compile else "")
        self.setting = setting
        command = [
            sys.executable,
            __file__,
            "--worker",
            f"--variant={variant}",
            f"--setting={setting}",
            f"--towers={args.towers}",
        ]
        if args.steps:
            command.append(f"--steps={args.steps}")
        if jit_compile:
            command.append("--jit_compile")
        if args.torch_threads:
            command.append(f"--torch_threads={args.torch_threads}")
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": path}
        if variant == "torch":
            # PyTorch's OpenMP threads spin while they wait: on cores shared
            # with other processes (the other variants' pipelines, anything
            # else) its steps then ran 10-100x slower.
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        self.error = None
        self._expect("@ready")

    def _expect(self, tag):
        """The rest of the next stdout line that starts with `tag`, or None."""
        if self.error is None:
            for line in self._process.stdout:
                if line.startswith(tag):
                    return line[len(tag) :].strip()
            self._process.wait()
            self._stderr.seek(0)
            self.error = self._stderr.read()[-2000:] or "worker exited"
        return None

    def _send(self, line):
        if self.error is None:
            try:
                self._process.stdin.write(line + "\n")
                self._process.stdin.flush()
            except BrokenPipeError:
                self._expect("@never")  # collects the exit and its error

    def time_window(self):
        self._send("window")
        self._expect("@window")

    def result(self):
        self._send("done")
        result = self._expect("@result")
        self._process.wait()
        self._stderr.close()
        if result is None:
            return {
                "variant": self.variant,
                "setting": self.setting,
                "error": self.error,
            }
        return json.loads(result)


def _measure_setting(setting, variants, args):
    """Results of the (variant, jit_compile) pairs, timed in turns."""
    workers = [_Worker(v, setting, args, jit_compile=j) for v, j in variants]
    for window in range(args.windows):
        shift = window % len(workers)
        for worker_ in workers[shift:] + workers[:shift]:
            worker_.time_window()
    return [worker_.result() for worker_ in workers]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--setting", choices=list(SETTINGS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--windows", type=int, default=7)
    parser.add_argument("--steps", type=int, default=0, help="steps per window")
    parser.add_argument("--jit_compile", action="store_true")
    parser.add_argument(
        "--towers", type=int, default=0, help="0: leo_tf's automatic choice"
    )
    parser.add_argument(
        "--torch_threads", type=int, default=0, help="0: PyTorch's default"
    )
    parser.add_argument(
        "--with_xla",
        action="store_true",
        help="also measure the shipped step with --jit_compile",
    )
    parser.add_argument(
        "--json", default=str(REPO / "benchmarks" / "results" / "bench_step.json")
    )
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1 (leo_tf's default)")
    print(f"TensorFlow workers run with TF_ENABLE_ONEDNN_OPTS={onednn}")
    # Looked up, not imported: only the torch worker processes need it.
    have_torch = importlib.util.find_spec("torch") is not None
    if not have_torch:
        print(
            "torch is not installed: skipping the PyTorch variant "
            "(pip install '.[bench]' to include it)"
        )
    results = []
    for setting in args.settings.split(","):
        variants = []
        for variant in args.variants.split(","):
            if variant == "torch" and not have_torch:
                continue
            if variant == "mirrored" and SETTINGS[setting]["mode"] != "train":
                continue
            variants.append((variant, False))
            if variant == "shipped" and args.with_xla:
                variants.append((variant, True))
        if not variants:
            continue
        for result in _measure_setting(setting, variants, args):
            results.append(result)
            print(_row(result), flush=True)
    print()
    print(_table(results))
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"results": results, "ratios": _ratios(results)}, indent=2)
    )
    print(f"\nwritten to {path}")


def _row(result):
    if "error" in result:
        return f"{result['setting']:12s} {result['variant']:12s} FAILED: {result['error'][-300:]}"
    return (
        f"{result['setting']:12s} {result['variant']:12s} "
        f"{result['episodes_per_second']:10.1f} episodes/s  "
        f"peak {result['peak_rss_mb']:7.0f} MB (+{result['peak_growth_mb']:.0f} MB)"
    )


def _ratios(results):
    by_key = {(r["setting"], r["variant"]): r for r in results if "error" not in r}
    ratios = {}
    for (setting, variant), result in by_key.items():
        if variant == "shipped":
            continue
        shipped = by_key.get((setting, "shipped"))
        if shipped:
            ratios[f"{setting}: shipped / {variant}"] = (
                shipped["episodes_per_second"] / result["episodes_per_second"]
            )
    return ratios


def _table(results):
    lines = [
        f"{'setting':12s} {'variant':12s} {'episodes/s':>10s} {'peak MB':>8s} {'growth MB':>9s}",
    ]
    for result in results:
        if "error" in result:
            lines.append(f"{result['setting']:12s} {result['variant']:12s} failed")
            continue
        lines.append(
            f"{result['setting']:12s} {result['variant']:12s} "
            f"{result['episodes_per_second']:10.1f} {result['peak_rss_mb']:8.0f} "
            f"{result['peak_growth_mb']:9.0f}"
        )
    lines.append("")
    for name, ratio in _ratios(results).items():
        lines.append(f"{name:40s} {ratio:6.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
