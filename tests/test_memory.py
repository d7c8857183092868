"""Runs whose tensors overflow int32 or memory are refused before they start."""

import dataclasses
import mmap
import os
import resource

import pytest
from absl import flags
from absl.testing import flagsaver

from leo_tf import config as config_lib
from leo_tf import memory, meta_eval, steps, train
from tests import data_fixtures, run_fixtures

FLAGS = flags.FLAGS
GIB = 2**30
PLENTY = (2**60, "a test's plenty")


def _config(tmp_path, evaluation_mode=False, **data):
    config = run_fixtures.toy_run_config(
        tmp_path / "data", tmp_path / "run", evaluation_mode=evaluation_mode
    )
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **data))


def _validation(batch_size, num_val):
    return memory.EvalShape(
        "meta-validation", "metavalid_batch_size", batch_size, num_val
    )


def test_tensor_over_the_int32_limit_is_refused_naming_it_and_its_flags(tmp_path):
    config = _config(tmp_path, metatrain_batch_size=10_000_000)
    with pytest.raises(config_lib.ConfigError) as raised:
        memory.check_fits(config, 16, [_validation(20, 23)], 0, PLENTY)
    assert str(raised.value) == (
        "--metatrain_batch_size=10000000: the meta-training query batch "
        "[10000000, 5, 15, 16] would have 12,000,000,000 elements, more than "
        "TensorFlow's int32 limit of 2,147,483,647; lower "
        "--metatrain_batch_size, --num_val_examples_per_class or --num_classes"
    )


def test_many_classes_name_num_classes_among_the_flags_to_lower(tmp_path):
    # 500-way: the meta-validation relation network pairs [b, 500, 500, 2L]
    # outgrow int32; --num_classes sizes them, quadratically.
    config = _config(tmp_path, num_classes=500)
    with pytest.raises(config_lib.ConfigError) as raised:
        memory.check_fits(config, 16, [_validation(2000, 3)], 0, PLENTY)
    message = str(raised.value)
    assert "the meta-validation relation network pairs [2000, 500, 500, 16]" in message
    assert message.endswith(
        "lower --metavalid_batch_size, --num_tr_examples_per_class, "
        "--num_classes or --num_latents"
    )


def test_int32_limit_is_exact(tmp_path):
    # 2-way 1-shot, V = 63: the meta-validation query logits [b, 2, 2, 64]
    # (LEO's N columns, no baseline) have b * 2^8 elements.
    config = _config(tmp_path, num_classes=2, metavalid_batch_size=2**23)
    with pytest.raises(config_lib.ConfigError, match="2,147,483,648 elements"):
        memory.check_fits(config, 16, [_validation(2**23, 63)], 0, PLENTY)
    memory.check_fits(config, 16, [_validation(2**23 - 1, 63)], 0, PLENTY)


def test_estimate_counts_every_tensor_times_its_copies(tmp_path):
    # --evaluation_mode, D = 16, L = 8, S = 5, 50 x 5-way 1-shot, V = 23.
    config = _config(tmp_path, evaluation_mode=True)
    weights = 12 * (16 * 8) + 36 * (16 * 16) + 12 * (8 * 32)
    gathered_queries = 2 * (50 * 5 * 23 * 16)
    support = 5 * (50 * 5 * 1 * 16)
    latents = (5 + 3) * (50 * 5 * 1 * 8)
    pairs = 3 * (50 * 5 * 5 * 16)
    logits = 2 * (50 * 5 * 10 * 24)
    scores = 2 * (50 * 5 * 24 * 3)
    test = memory.EvalShape("meta-test", "metatest_batch_size", 50, 23)
    tensors = memory.run_tensors(config, 16, [test])
    assert memory.estimated_peak_bytes(tensors, 1000) == (
        GIB
        + 2 * 1000
        + 4 * (weights + gathered_queries + support + latents + pairs + logits + scores)
    )


def test_only_the_meta_test_counts_the_baseline_columns(tmp_path):
    # 50 x 5-way 1-shot, V = 23: meta_eval scores the baseline (N more
    # columns, one more score) only in the meta-test.
    config = _config(tmp_path)
    shapes = {}
    for split, flag in [
        ("meta-validation", "metavalid_batch_size"),
        ("meta-test", "metatest_batch_size"),
    ]:
        evaluation = memory.EvalShape(split, flag, 50, 23)
        for tensor in memory.eval_tensors(config, 16, evaluation):
            shapes[tensor.name] = tensor.shape
    assert shapes["meta-validation query logits"] == (50, 5, 5, 24)
    assert shapes["meta-validation query scores"] == (50, 5, 24, 2)
    assert shapes["meta-test query logits"] == (50, 5, 10, 24)
    assert shapes["meta-test query scores"] == (50, 5, 24, 3)


def test_query_batch_too_large_to_gather_is_not_counted(tmp_path):
    # 200 x 5-way 1-shot, V = 599, D = 640: 1.4 GiB of queries, scored class
    # by class instead of gathered.
    config = _config(tmp_path, evaluation_mode=True)
    test = memory.EvalShape("meta-test", "metatest_batch_size", 200, 599)
    names = [tensor.name for tensor in memory.run_tensors(config, 640, [test])]
    assert "meta-test query logits" in names
    assert "meta-test gathered query batch" not in names
    small = memory.EvalShape("meta-test", "metatest_batch_size", 200, 15)
    names = [tensor.name for tensor in memory.run_tensors(config, 640, [small])]
    assert "meta-test gathered query batch" in names


def test_run_that_needs_more_memory_than_available_is_refused(tmp_path):
    # 40000 episodes x 5 classes x 5 columns x 600 examples, 2 copies: 4.5 GiB.
    config = _config(tmp_path, metavalid_batch_size=40000)
    limit = (4 * GIB, "a 4 GiB test limit")
    with pytest.raises(config_lib.ConfigError) as raised:
        memory.check_fits(config, 640, [_validation(40000, 599)], 0, limit)
    message = str(raised.value)
    assert message.startswith("--metavalid_batch_size=40000: the run needs about ")
    assert (
        "GiB of memory at its peak (4.5 GiB for the meta-validation query logits "
        "[40000, 5, 5, 600]), more than the 4.0 GiB available (a 4 GiB test "
        "limit); lower --metavalid_batch_size or --num_classes"
    ) in message
    memory.check_fits(config, 640, [_validation(40000, 599)], 0, (64 * GIB, "more"))


def test_available_memory_is_the_least_limit(tmp_path, monkeypatch):
    limit_file = tmp_path / "memory.max"
    limit_file.write_text("max\n")
    monkeypatch.setattr(memory, "_CGROUP_LIMITS", (str(limit_file),))
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(
        resource, "getrlimit", lambda kind: (resource.RLIM_INFINITY,) * 2
    )
    assert memory.available_memory() == (physical, "physical memory")
    limit_file.write_text("1048576\n")
    assert memory.available_memory() == (
        2**20,
        f"the cgroup limit {limit_file}",
    )
    limit_file.write_text(f"{3 * GIB}\n")
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (4 * GIB, 4 * GIB))
    monkeypatch.setattr(memory, "_mapped_not_resident", lambda: GIB // 2)
    assert memory.available_memory() == (
        4 * GIB - GIB // 2 - 5 * GIB // 4,
        "the address-space limit RLIMIT_AS (ulimit -v), less the address space "
        "mapped but not resident",
    )


def test_mapped_but_not_resident_memory_is_counted(tmp_path):
    # A 64 MiB mapping never touched adds to the address space only.
    before = memory._mapped_not_resident()
    with open(tmp_path / "sparse", "wb+") as stream:
        stream.truncate(64 * 2**20)
        with mmap.mmap(stream.fileno(), 64 * 2**20):
            assert memory._mapped_not_resident() - before >= 60 * 2**20


def test_evaluation_shapes_and_files_come_from_the_data(tmp_path):
    data_fixtures.write_toy_dataset(tmp_path / "data")  # 24 examples a class
    config = _config(tmp_path)
    config = dataclasses.replace(
        config,
        train=dataclasses.replace(config.train, evaluate_after_training=True),
    )
    assert memory.run_evaluations(config) == (
        16,
        [
            memory.EvalShape("meta-validation", "metavalid_batch_size", 20, 23),
            memory.EvalShape("meta-test", "metatest_batch_size", 50, 23),
        ],
    )
    files = tmp_path / "data" / "toy" / "center"
    assert memory.files_read(config) == sum(
        (files / f"{split}_embeddings.pkl").stat().st_size
        for split in ("train", "val", "test")
    )


def test_train_refuses_a_run_too_big_before_tensorflow_works(
    tmp_path, monkeypatch, capsys
):
    data = data_fixtures.write_toy_dataset(tmp_path / "data")
    monkeypatch.setattr(memory, "available_memory", lambda: (GIB, "a test limit"))

    def no_step(*args, **kwargs):
        raise AssertionError("a step was compiled")

    monkeypatch.setattr(steps, "compile_train_step", no_step)
    monkeypatch.setattr(meta_eval, "MetaEvaluator", no_step)
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        with pytest.raises(SystemExit) as exit_info:
            train.run(
                [
                    "leo_tf.train",
                    f"--data_path={data}",
                    "--dataset_name=toy",
                    f"--checkpoint_path={tmp_path / 'run'}",
                    "--metatest_batch_size=100000",
                    "--evaluate_after_training",
                ]
            )
    FLAGS.unparse_flags()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        "leo_tf.train: error: --metatest_batch_size=100000: the run needs about "
    )
    assert "more than the 1.0 GiB available (a test limit)" in err
    assert not (tmp_path / "run").exists()
