"""Will a run fit? Its largest tensors and peak memory, before TensorFlow runs.

`check_fits` refuses, with a ConfigError naming the flag to lower, a run in
which a tensor would have more elements than TensorFlow's int32 indexing
allows, or whose estimated peak resident memory exceeds what the process may
use (physical memory, the cgroup's limit, RLIMIT_AS, whichever is least).

The estimate is an upper bound built from the step's tensors, each counted
as often as it is alive at once (float32, 4 bytes an element):

* a meta-training batch, support [B, N, K, D] and query [B, N, V, D], lives
  4 times (sampled ahead, handed over, in the step, the previous one); so
  does its noise (noise.noise_shapes), drawn ahead by tf.data;
* the step's activations, kept for the second-order gradient: ~4 support-
  sized tensors per support-loss evaluation (S + F + 1), 8 query-sized, 6 of
  the relation network's pairs [B, NK, NK, 2L];
* an evaluation batch's support set 5 times; its queries are scored
  without building them (meta_eval): the logits of each (episode, class)
  pair's S = K + V examples against the episode's N columns (2N with the
  baseline, which only the meta-test reports) and their scores, twice each,
  plus the gathered queries, twice, where meta_eval would gather them (at
  most MAX_GATHERED_BYTES);
* the weights 12 times (the weights, Adam's two slots, the per-term
  gradients, their sum and the clipped gradients);
* the embedding files twice (the loaded arrays, the normalised copy);
* a fixed 1 GiB for the interpreter, TensorFlow and the compiled steps.

Measured peaks (BUILD.md, "Memory estimate") are 0.53-0.76 of the estimate
for batches of up to 800 episodes in evaluation and 192 in meta-training;
not counted is what grows with the number of the meta-training step's ops
(one 2-D MatMul per episode and use).
"""

import dataclasses
import math
import os
import re
import resource

from leo_tf.config import ConfigError
from leo_tf.data import embeddings, episodes, meta_dataset

INT32_MAX = 2**31 - 1
_BYTES_PER_ELEMENT = 4
_BASE_BYTES = 2**30
# The largest query batch meta_eval gathers (larger ones it scores class by
# class).
MAX_GATHERED_BYTES = 2**28
# Address space a run maps beyond its resident memory after the check (thread
# stacks, allocator arenas): its peak address space exceeded its peak resident
# memory by 1.9-2.0 GiB, 0.8 GiB of it mapped by the time of the check.
_LATER_UNRESIDENT_BYTES = 5 * 2**28  # 1.25 GiB
_CGROUP_LIMITS = (
    "/sys/fs/cgroup/memory.max",  # cgroup v2
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A tensor of a step: what it is, its shape, how many copies are alive
    at the peak, and the flags (name=value) that set its size."""

    name: str
    shape: tuple
    copies: int
    flags: tuple

    @property
    def elements(self):
        return math.prod(self.shape)

    @property
    def bytes(self):
        return self.copies * self.elements * _BYTES_PER_ELEMENT


@dataclasses.dataclass(frozen=True)
class EvalShape:
    """An evaluation the run makes: its batch flag and query examples per class."""

    split: str  # "meta-validation" or "meta-test"
    batch_flag: str  # "metavalid_batch_size" or "metatest_batch_size"
    batch_size: int
    num_val: int  # V: all remaining examples of a class, at most 600 - K


def _flag(config, name):
    for section in (config.data, config.model, config.train):
        if hasattr(section, name):
            return f"{name}={getattr(section, name)}"
    raise KeyError(name)


def _flags(config, *names):
    return tuple(_flag(config, name) for name in names)


def weight_tensors(config, embedding_dim):
    """The model's kernels (their gradients and Adam's slots are copies)."""
    dim, latents = embedding_dim, config.model.num_latents
    sizes = ("num_latents",)
    return [
        Tensor("encoder kernel", (dim, latents), 12, _flags(config, *sizes)),
        Tensor(
            "relation network kernel",
            (2 * latents, 2 * latents),
            3 * 12,  # three of them
            _flags(config, *sizes),
        ),
        Tensor("decoder kernel", (latents, 2 * dim), 12, _flags(config, *sizes)),
    ]


def train_tensors(config, embedding_dim):
    """The tensors of a meta-training step, with their copies at the peak."""
    data, model = config.data, config.model
    b, n, k = (
        data.metatrain_batch_size,
        data.num_classes,
        data.num_tr_examples_per_class,
    )
    v, d, l = data.num_val_examples_per_class, embedding_dim, model.num_latents
    s, f = model.inner_unroll_length, model.finetuning_unroll_length
    batch = ("metatrain_batch_size",)
    support_flags = _flags(config, *batch, "num_tr_examples_per_class", "num_classes")
    query_flags = _flags(config, *batch, "num_val_examples_per_class", "num_classes")
    return [
        # Batch and encoder dropout mask (4 each), activations of the loops.
        Tensor(
            "meta-training support batch",
            (b, n, k, d),
            8 + 4 * (s + f + 1),
            support_flags,
        ),
        Tensor(
            "meta-training weight noise",
            (s + 1, b, n, k, d),
            4,
            support_flags + _flags(config, "inner_unroll_length"),
        ),
        Tensor(
            "meta-training support dropout masks",
            (s + f, b, n, k, d),
            4,
            support_flags
            + _flags(config, "inner_unroll_length", "finetuning_unroll_length"),
        ),
        # Batch and dropout mask (4 each), the dropped copy and gradients.
        Tensor("meta-training query batch", (b, n, v, d), 16, query_flags),
        Tensor(
            "meta-training latent codes",
            (b, n, k, l),
            4 * (s + 3),
            support_flags + _flags(config, "num_latents"),
        ),
        Tensor(
            "meta-training relation network pairs",
            (b, n * k, n * k, 2 * l),
            6,
            support_flags + _flags(config, "num_latents"),
        ),
        Tensor("meta-training query logits", (b, n, v, n), 4, query_flags),
    ]


def eval_tensors(config, embedding_dim, evaluation):
    """The tensors of an evaluation step on `evaluation` (EvalShape)."""
    data, model = config.data, config.model
    b, n, k = evaluation.batch_size, data.num_classes, data.num_tr_examples_per_class
    v, d, l = evaluation.num_val, embedding_dim, model.num_latents
    batch = _flags(config, evaluation.batch_flag)
    name = evaluation.split
    groups = 2 if name == "meta-test" else 1  # meta_eval's with_baseline
    queries = Tensor(
        f"{name} gathered query batch",
        (b, n, v, d),
        2,
        batch + _flags(config, "num_classes"),
    )
    gathered = [queries] if queries.bytes <= 2 * MAX_GATHERED_BYTES else []
    support = _flags(config, "num_tr_examples_per_class", "num_classes")
    return gathered + [
        Tensor(f"{name} support batch", (b, n, k, d), 5, batch + support),
        Tensor(
            f"{name} latent codes",
            (b, n, k, l),
            model.inner_unroll_length + 3,
            batch + support + _flags(config, "num_latents"),
        ),
        Tensor(
            f"{name} relation network pairs",
            (b, n * k, n * k, 2 * l),
            3,
            batch + support + _flags(config, "num_latents"),
        ),
        Tensor(
            f"{name} query logits",
            (b, n, groups * n, k + v),
            2,
            batch + _flags(config, "num_classes"),
        ),
        Tensor(
            f"{name} query scores",
            (b, n, k + v, groups + 1),
            2,
            batch + _flags(config, "num_classes"),
        ),
    ]


def run_tensors(config, embedding_dim, evaluations):
    """The weights, the meta-training step's tensors (unless
    --evaluation_mode) and those of each evaluation (EvalShapes)."""
    tensors = weight_tensors(config, embedding_dim)
    if not config.train.evaluation_mode:
        tensors += train_tensors(config, embedding_dim)
    for evaluation in evaluations:
        tensors += eval_tensors(config, embedding_dim, evaluation)
    return tensors


def estimated_peak_bytes(tensors, data_bytes):
    """Upper bound of the peak resident memory; data_bytes: the files read."""
    return _BASE_BYTES + 2 * data_bytes + sum(t.bytes for t in tensors)


def available_memory():
    """(bytes, where that limit comes from): the least of physical memory,
    the cgroup memory limit and RLIMIT_AS."""
    limits = [
        (os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory")
    ]
    for path in _CGROUP_LIMITS:
        try:
            with open(path, encoding="ascii") as stream:
                text = stream.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append((int(text), f"the cgroup limit {path}"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(
            (
                soft - _mapped_not_resident() - _LATER_UNRESIDENT_BYTES,
                "the address-space limit RLIMIT_AS (ulimit -v), less the "
                "address space mapped but not resident",
            )
        )
    return min(limits)


def _mapped_not_resident():
    """Bytes of this process's address space that are mapped but not resident.

    RLIMIT_AS bounds the address space, which is larger than the resident
    memory the estimate bounds: after the imports TensorFlow has mapped
    ~0.8 GiB it does not touch, and maps _LATER_UNRESIDENT_BYTES more while
    the run builds its steps and threads.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as stream:
            status = dict(
                re.findall(r"^(VmSize|VmRSS):\s+(\d+) kB", stream.read(), re.M)
            )
    except OSError:
        return 0
    if len(status) < 2:
        return 0
    return max(0, int(status["VmSize"]) - int(status["VmRSS"])) * 1024


def _gib(num_bytes):
    return f"{num_bytes / 2**30:.1f} GiB"


def _lower(tensor):
    """ "--a, --b or --c": the flags that size `tensor`."""
    names = ["--" + flag.split("=")[0] for flag in tensor.flags]
    return " or ".join([", ".join(names[:-1]), names[-1]] if names[1:] else names)


def check_fits(config, embedding_dim, evaluations, data_bytes, available=None):
    """Raises ConfigError if a tensor overflows int32 or the run needs more
    memory than `available` ((bytes, source); default available_memory()).

    Args:
      config: the RunConfig.
      embedding_dim: D, from the data.
      evaluations: the EvalShapes of the evaluations the run makes.
      data_bytes: the size of the embedding files the run reads.
    """
    tensors = run_tensors(config, embedding_dim, evaluations)
    check_tensors_fit(tensors, estimated_peak_bytes(tensors, data_bytes), available)


def check_tensors_fit(tensors, needed, available=None):
    """Raises ConfigError if a tensor of `tensors` overflows int32, or if
    `needed` bytes, a run's estimated peak, exceed `available` ((bytes,
    source); default available_memory()); each names the flags to lower."""
    largest = max(tensors, key=lambda t: t.elements)
    if largest.elements > INT32_MAX:
        raise ConfigError(
            f"--{largest.flags[0]}: the {largest.name} {list(largest.shape)} "
            f"would have {largest.elements:,} elements, more than TensorFlow's "
            f"int32 limit of {INT32_MAX:,}; lower {_lower(largest)}"
        )
    limit, source = available or available_memory()
    if needed > limit:
        biggest = max(tensors, key=lambda t: t.bytes)
        raise ConfigError(
            f"--{biggest.flags[0]}: the run needs about {_gib(needed)} of memory "
            f"at its peak ({_gib(biggest.bytes)} for the {biggest.name} "
            f"{list(biggest.shape)}), more than the {_gib(limit)} available "
            f"({source}); lower {_lower(biggest)}"
        )


def run_evaluations(config):
    """(D, [EvalShape]) of the evaluations the run makes, from its split files.

    Meta-training validates on the val split (and, with
    --evaluate_after_training, tests on the test split); --evaluation_mode
    tests only. Loads those splits and checks that they can supply the
    episodes, so data errors surface here first.
    """
    data, train = config.data, config.train
    splits = []
    if not train.evaluation_mode:
        splits.append(("val", "meta-validation", "metavalid_batch_size"))
    if train.evaluation_mode or train.evaluate_after_training:
        splits.append(("test", "meta-test", "metatest_batch_size"))
    embedding_dim, evaluations = None, []
    for split, name, batch_flag in splits:
        classes = meta_dataset.load_classes(data, split, embedding_dim)
        embedding_dim = classes.embedding_dim
        num_val = episodes.eval_num_val_examples(
            classes, data.num_tr_examples_per_class, data.total_examples_per_class
        )
        embeddings.check_episode_requirements(
            classes,
            num_classes=data.num_classes,
            examples_per_class=data.num_tr_examples_per_class + num_val,
            split=split,
        )
        evaluations.append(
            EvalShape(name, batch_flag, getattr(data, batch_flag), num_val)
        )
    return embedding_dim, evaluations


def files_read(config):
    """Total size in bytes of the embedding files the run reads."""
    splits = ["test"] if config.train.evaluation_mode else ["train", "val"]
    if config.train.evaluate_after_training and not config.train.evaluation_mode:
        splits.append("test")
    paths = [
        embeddings.split_path(
            config.data.data_path,
            config.data.dataset_name,
            config.data.embedding_crop,
            split,
        )
        for split in splits
    ]
    return sum(path.stat().st_size for path in paths if path.is_file())


def check_run(config):
    """check_fits for the run `config` describes, its shapes read from the data.

    Raises ConfigError (see check_fits) or DataError (an unreadable split).
    """
    embedding_dim, evaluations = run_evaluations(config)
    check_fits(config, embedding_dim, evaluations, files_read(config))
