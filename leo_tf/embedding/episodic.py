"""Episodic fine-tuning of the embedding network: prototypes, cosine, scale.

After supervised pre-training (pretrain.py; with --epochs=0, none: the
network starts as initialised), `finetune` trains the feature extractor on
few-shot episodes of the meta-train classes, with the loss of the
nearest-class-mean (cosine) classifier that few-shot evaluation scores
(Snell et al. 2017's prototypical loss, with cosine similarity and a learned
scale as in Chen et al. 2019):

    episode: `episodic_ways` classes, `episodic_shots` support and
      `episodic_queries` query images of each, drawn without replacement
    features f = extractor(augment(images))                  [W * (S + Q), D]
    prototypes p_c = unit(mean_s unit(f_support[c, s]))      [W, D]
    logits = scale * unit(f_query) . p^T                     [W * Q, W]
    loss = mean softmax cross-entropy of each query's class

`unit` scales a vector to unit length; `scale` is trained with the network
(initial value `episodic_scale`); Adam with a learning rate
cosine-decayed to 0 over the episodes. Augmentation (pre-training's, freshly
seeded) and batch norm run in training mode, as in pre-training.
"""

import logging
from typing import Dict, List, Sequence

import keras
import numpy as np
import tensorflow as tf

from leo_tf.embedding import pretrain

# Episodes per logged line of loss and accuracy (at most this many lines).
_LOG_LINES = 10


class EpisodeError(ValueError):
    """The meta-train classes cannot fill the configured episodes."""


def check_episodes_fit(counts: Sequence[int], config) -> None:
    """Raises EpisodeError unless every episode can be drawn.

    Args:
      counts: images per meta-train class [num_classes].
      config: options.TrainConfig with episodic_* fields.
    """
    if len(counts) < config.episodic_ways:
        raise EpisodeError(
            f"--episodic_ways={config.episodic_ways}: the train split has only "
            f"{len(counts)} classes"
        )
    per_class = config.episodic_shots + config.episodic_queries
    if min(counts) < per_class:
        raise EpisodeError(
            f"--episodic_shots={config.episodic_shots} + --episodic_queries="
            f"{config.episodic_queries} = {per_class} images per class, but a "
            f"train class has only {min(counts)}"
        )


def rows_by_class(labels: np.ndarray, num_classes: int) -> List[np.ndarray]:
    """Row indices of each class: labels int [n] -> num_classes arrays."""
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


def sample_episode(
    rng: np.random.Generator, class_rows: List[np.ndarray], ways: int, per_class: int
) -> np.ndarray:
    """Rows of one episode: int [ways, per_class], distinct classes and rows.

    Row [c, j] is image j of the episode's class c; callers take the first
    shots of each class as support, the rest as queries.
    """
    classes = rng.choice(len(class_rows), ways, replace=False)
    return np.stack(
        [rng.choice(class_rows[c], per_class, replace=False) for c in classes]
    )


def unit(x: tf.Tensor) -> tf.Tensor:
    """x [..., D] scaled to unit length along the last axis."""
    return tf.math.l2_normalize(x, axis=-1, epsilon=1e-12)


def prototype_logits(
    features: tf.Tensor, ways: int, shots: int, scale: tf.Tensor
) -> tf.Tensor:
    """Scaled cosine similarities of the queries to the class prototypes.

    Args:
      features: float32 [ways * (shots + queries), D], class-major: rows
        c * (shots + queries) + j, support first (j < shots).
      ways, shots: episode shape.
      scale: scalar multiplying the cosines.

    Returns:
      logits float32 [ways * queries, ways], queries class-major.
    """
    per_class = tf.reshape(features, [ways, -1, features.shape[-1]])
    prototypes = unit(tf.reduce_mean(unit(per_class[:, :shots]), axis=1))
    queries = tf.reshape(unit(per_class[:, shots:]), [-1, features.shape[-1]])
    return scale * tf.matmul(queries, prototypes, transpose_b=True)


def finetune(
    extractor: keras.Model,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config,
) -> Dict[str, List[float]]:
    """Trains `extractor` in place on `config.episodic_episodes` episodes.

    Args:
      extractor: images float32 [B, H, W, C] (0..255) -> features [B, D].
      images: uint8 [n, H, W, C], meta-train images only.
      labels: int [n], class index in [0, num_classes).
      num_classes: number of meta-train classes.
      config: options.TrainConfig (episodic_* fields, augmentation, seed).

    Returns:
      {"episode_loss", "episode_accuracy", "scale"}: means over each block of
      logged episodes (query accuracy), and the scale at each block's end.
    """
    class_rows = rows_by_class(labels, num_classes)
    check_episodes_fit([len(rows) for rows in class_rows], config)
    ways, shots = config.episodic_ways, config.episodic_shots
    per_class = shots + config.episodic_queries
    rng = np.random.default_rng(config.seed)
    scale = keras.Variable(float(config.episodic_scale), name="scale")
    schedule = keras.optimizers.schedules.CosineDecay(
        config.episodic_learning_rate, config.episodic_episodes
    )
    optimizer = keras.optimizers.Adam(schedule)
    variables = extractor.trainable_variables + [scale]
    query_labels = tf.repeat(tf.range(ways), config.episodic_queries)
    inputs = keras.Input(shape=images.shape[1:])
    augmentation = pretrain.build_augmentation(config, images.shape[1:])
    augmented_features = keras.Model(inputs, extractor(augmentation(inputs)))

    @tf.function
    def train_step(batch):
        with tf.GradientTape() as tape:
            features = augmented_features(tf.cast(batch, tf.float32), training=True)
            logits = prototype_logits(features, ways, shots, scale)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(query_labels, logits)
            )
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), query_labels)
        return loss, tf.reduce_mean(tf.cast(correct, tf.float32))

    history = {"episode_loss": [], "episode_accuracy": [], "scale": []}
    block = max(1, -(-config.episodic_episodes // _LOG_LINES))
    losses, accuracies = [], []
    for episode in range(config.episodic_episodes):
        rows = sample_episode(rng, class_rows, ways, per_class)
        loss, accuracy = train_step(images[rows.ravel()])
        losses.append(float(loss))
        accuracies.append(float(accuracy))
        if len(losses) == block or episode + 1 == config.episodic_episodes:
            history["episode_loss"].append(float(np.mean(losses)))
            history["episode_accuracy"].append(float(np.mean(accuracies)))
            history["scale"].append(float(scale.numpy()))
            logging.info(
                "episodic fine-tuning episode %d/%d: loss %.4f, query accuracy "
                "%.4f, scale %.2f",
                episode + 1,
                config.episodic_episodes,
                history["episode_loss"][-1],
                history["episode_accuracy"][-1],
                history["scale"][-1],
            )
            losses, accuracies = [], []
    return history
