"""leo_tf: Meta-Learning with Latent Embedding Optimization in TensorFlow 2.

Modules (the library never imports a command; commands import the library):

    config.py         flags (the authors' names and defaults) -> typed configs
    data/             embedding pickles -> validated per-class arrays ->
                      seeded N-way K-shot episodes; the built-in synthetic set
    noise.py          a step's random numbers, from (seed, step)
    layers.py         Keras layers: Encoder, RelationNetwork, Decoder
    ops.py            tensor kernels under the equations, in their fastest form
    gaussians.py      LEO's Gaussians: parameters, samples, KL, encoder penalty
    model.py          LEO as Section 3 of the paper, one method per equation
    reference.py      LEO written literally per episode, to check model.py
    steps.py          compiled steps: towers, second-order gradients, NaN guard
    runtime.py        thread settings for CPUs, towers per host
    distribute.py     tf.distribute strategies and the chief
    checkpoints.py    run-directory files: lock, atomic writes, validated
                      records, checkpoint integrity, best-checkpoint promotion
    run_directory.py  the run directory as the commands use it; LEO restored
    trainer.py        the training loop, validation and checkpointing
    progress.py       TensorBoard summaries and the console progress line
    evaluation.py     meta-test accuracy with a 95% interval, beside the baseline
    meta_eval.py      the one batch-evaluation loop (meta-validation, meta-test)
    baseline.py       the cosine nearest-class-mean baseline and 95% intervals
    uncertainty.py    S sampled adaptations of a task: mean, spread, entropy
    memory.py         will a run fit: largest tensors and peak memory
    paths.py          where leo_tf keeps the data it makes
    cli.py            what the commands share: one error line, exit status
    train.py          `python -m leo_tf.train`: train and/or evaluate
    export.py         `python -m leo_tf.export`: a checkpoint -> SavedModel
    search.py         `python -m leo_tf.search`: random hyperparameter search
    search_space.py   its options and space: --space entries, seeded draws
    trials.py         its trials: trained in turn, recorded, the best kept
    embed.py          `python -m leo_tf.embed`: images -> embedding pickles
    embedding/        what leo_tf.embed uses: image sources, splits, backbones,
                      pre-training, pickle writing
    regression/       `python -m leo_tf.regression`: few-shot regression with
                      LEO and a MAML baseline

Importing leo_tf before TensorFlow turns on TensorFlow's oneDNN CPU kernels
(`TF_ENABLE_ONEDNN_OPTS=1`) unless that variable is already set. TensorFlow
reads it once, when it is imported, and by default enables oneDNN only on
CPUs with AVX-512-class features; elsewhere its Eigen kernels, compiled for
AVX without FMA, run LEO's largest matmuls (the relation network's) at half
the speed of oneDNN's, which picks the CPU's best instructions at run time.
Results differ from Eigen's at the level of float32 rounding. Set
`TF_ENABLE_ONEDNN_OPTS=0` to keep TensorFlow's default. See BUILD.md,
Performance.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
