"""Meta-test evaluation of a training directory (--evaluation_mode).

Restores the best checkpoint (else, or if it is damaged, the newest intact
checkpoint, saying so: run_directory.RunDirectory), averages meta-test accuracy over
num_metatest_episodes episodes (the authors' 10000; drawn in batches of
metatest_batch_size, the last one trimmed) with a 95% interval of 1.96 std / sqrt(episodes), computes
the nearest-class-mean baseline on the same episodes, and writes
`test_results.json`. A SIGTERM or SIGINT stops it between batches, before
test_results.json is written (cli.Stopped).

It takes no lock: it only reads checkpoints, which a running trainer never
changes in place (best_checkpoint is resolved once, and the directory it
names outlives the next promotion), and writes test_results.json atomically,
a file no trainer writes. The flags the weights depend on must match the
run's (checkpoints.FIXED_FOR_EVALUATION); the task (data set, N, K) may
differ, and test_results.json records both the evaluated and the trained one.
"""

from absl import logging

from leo_tf import (
    baseline,
    checkpoints,
    meta_eval,
    run_directory,
    runtime,
    stop_request,
)
from leo_tf.data import meta_dataset

_TASK_FIELDS = ("dataset_name", "num_classes", "num_tr_examples_per_class")


def _training_task(directory, config):
    """The task the run was trained on, from config.json; warns if it is not
    the one evaluated."""
    saved = directory.read_config()
    if saved is None:
        return None
    trained = {name: saved["data"][name] for name in _TASK_FIELDS}
    evaluated = {name: getattr(config.data, name) for name in _TASK_FIELDS}
    if trained != evaluated:
        logging.warning(
            "Evaluating on %s; the run was trained on %s",
            _describe_task(evaluated),
            _describe_task(trained),
        )
    return trained


def _describe_task(task):
    return (
        f"{task['num_classes']}-way {task['num_tr_examples_per_class']}-shot "
        f"episodes of {task['dataset_name']}"
    )


def evaluate(config):
    """Meta-test evaluation of the best (else latest) checkpoint.

    Returns the test_results.json payload: accuracy and its 95% interval over
    num_metatest_episodes episodes, the
    nearest-class-mean baseline on the same episodes, and what was evaluated.
    """
    directory = run_directory.RunDirectory(config.train.checkpoint_path)
    directory.check_usable(for_writing=False)
    directory.check_usable(
        for_writing=True, writes=f"the meta-test writes {checkpoints.RESULTS_FILE}"
    )
    test_classes = meta_dataset.load_classes(config.data, "test")
    embedding_dim = test_classes.embedding_dim
    directory.check_compatible(config, embedding_dim, checkpoints.FIXED_FOR_EVALUATION)
    training_task = _training_task(directory, config)
    leo = run_directory.build_leo(config.model, embedding_dim)
    prefix, source, step = directory.restore_for_reading(leo, "best", "evaluate")
    model = leo.model
    sampler = meta_dataset.eval_sampler(
        config.data, test_classes, "test", config.train.seed
    )
    batch_size = config.data.metatest_batch_size
    evaluator = meta_eval.MetaEvaluator(
        model,
        sampler,
        jit_compile=config.train.jit_compile,
        num_towers=runtime.num_towers(config.train.num_towers, batch_size),
    )
    episodes = _meta_test(evaluator, config.train.num_metatest_episodes)
    accuracy, ci95 = baseline.mean_and_ci95(episodes.accuracy)
    baseline_accuracy, baseline_ci95 = baseline.mean_and_ci95(
        episodes.baseline_accuracy
    )
    results = {
        "split": "test",
        "accuracy": accuracy,
        "ci95": ci95,
        "num_episodes": len(episodes.accuracy),
        "checkpoint": str(prefix),
        "checkpoint_source": source,
        "step": step,
        "dataset_name": config.data.dataset_name,
        "num_classes": config.data.num_classes,
        "num_tr_examples_per_class": config.data.num_tr_examples_per_class,
        "num_val_examples_per_class": sampler.num_val_examples_per_class,
        "baseline": "cosine nearest class mean",
        "baseline_accuracy": baseline_accuracy,
        "baseline_ci95": baseline_ci95,
        "training_task": training_task,
    }
    try:
        directory.write_results(results)
    except checkpoints.CheckpointError as error:
        raise checkpoints.CheckpointError(f"{error}; {result_line(results)}") from error
    return results


def _meta_test(evaluator, num_episodes):
    """EpisodeResults of the meta-test's episodes, with a progress line.

    A SIGTERM or SIGINT stops it after the batch it arrives in (cli.Stopped),
    unless that batch was the last.
    """
    with stop_request.stoppable_evaluation(
        "meta-test", num_episodes, "episodes", checkpoints.RESULTS_FILE
    ) as after_batch:
        return evaluator.evaluate_episodes(num_episodes, after_batch)


def result_line(results):
    """The last line printed by evaluation: accuracy and 95% interval in %."""
    return (
        f"Meta-test accuracy {100 * results['accuracy']:.2f}% "
        f"+- {100 * results['ci95']:.2f}% (95% interval, "
        f"{results['num_episodes']} episodes, {results['num_classes']}-way "
        f"{results['num_tr_examples_per_class']}-shot, {results['dataset_name']}, "
        f"step {results['step']}); nearest-class-mean baseline "
        f"{100 * results['baseline_accuracy']:.2f}% "
        f"+- {100 * results['baseline_ci95']:.2f}%"
    )
