"""Supervised pre-training of the embedding network, and feature extraction.

The classifier trained here is

    images uint8-valued float32 [B, H, W, C]
      -> augmentation (training only: random shift / rotation / zoom)
      -> feature extractor: per-channel normalisation (meta-train pixel mean
         and variance, fixed) -> backbone -> features [B, D]
      -> linear softmax head Dense(num_classes) -> logits [B, num_classes]

fitted with Adam (cosine-decayed learning rate) and softmax cross-entropy on
the meta-train classes only. Embeddings are the feature extractor's outputs in
inference mode (batch-norm moving statistics, no augmentation): the features
before the head, after the backbone's last ReLU and pooling.

Reproducibility: `train_classifier` seeds Python, NumPy and TensorFlow
(`keras.utils.set_random_seed`) and turns on TensorFlow op determinism for the
process, so the same seed and data give bit-identical weights and features on
the same machine and software. (Keras then declines XLA compilation, which it
does not combine with op determinism.)
"""

import dataclasses
import logging
from typing import Dict, List

import keras
import numpy as np
import tensorflow as tf

from leo_tf.embedding import backbones
from leo_tf.embedding.options import TrainConfig


@dataclasses.dataclass
class TrainedClassifier:
    """The result of `train_classifier`.

    Attributes:
      extractor: images float32 [B, H, W, C] (0..255) -> features [B, D].
      classifier: images -> logits [B, num_classes] (augmentation, extractor,
        head); the head is the layer named "head".
      history: per-epoch "loss" and "accuracy" on augmented training batches
        (empty lists for 0 epochs).
    """

    extractor: keras.Model
    classifier: keras.Model
    history: Dict[str, List[float]]


# Pixels counted at once by `pixel_statistics` (np.bincount copies them to int64).
_PIXEL_CHUNK = 2**22


def pixel_statistics(images: np.ndarray):
    """Per-channel mean and variance of images uint8 [n, H, W, C] -> ([C], [C]).

    From each channel's histogram of its 256 levels, counted a chunk of
    pixels at a time: no copy of all the images (a float64 one was 8 times
    their size).
    """
    levels = np.arange(256, dtype=np.float64)
    pixels = images.reshape(-1, images.shape[-1])  # [n H W, C]
    counts = np.zeros((pixels.shape[1], 256))  # [C, 256]
    for start in range(0, len(pixels), _PIXEL_CHUNK):
        chunk = pixels[start : start + _PIXEL_CHUNK]
        for channel, channel_counts in enumerate(counts):
            channel_counts += np.bincount(chunk[:, channel], minlength=256)
    total = counts.sum(axis=1)
    mean = counts @ levels / total
    variance = (counts * (levels - mean[:, None]) ** 2).sum(axis=1) / total
    return mean, variance


def build_feature_extractor(
    config: TrainConfig, image_shape, mean, variance
) -> keras.Model:
    """Normalisation + backbone: float32 [B, H, W, C] (0..255) -> [B, D].

    Args:
      config: backbone choice and width.
      image_shape: (H, W, C).
      mean, variance: per-channel pixel statistics [C] of the meta-train images,
        fixed (not trained).
    """
    backbone = backbones.build_backbone(
        config.backbone,
        image_shape,
        conv_filters=config.conv_filters,
        wrn_depth=config.wrn_depth,
        wrn_width=config.wrn_width,
    )
    inputs = keras.Input(shape=tuple(image_shape), name="images")
    normalised = keras.layers.Normalization(
        mean=np.asarray(mean, np.float32),
        variance=np.maximum(np.asarray(variance, np.float32), 1e-6),
        name="normalise",
    )(inputs)
    return keras.Model(inputs, backbone(normalised), name="feature_extractor")


def build_augmentation(config: TrainConfig, image_shape) -> keras.Sequential:
    """Random shift / rotation / zoom, active in training only.

    Out-of-image pixels repeat the nearest edge pixel (background for
    Omniglot). Returns an identity model when every augmentation is 0.
    """
    # (name, layer, its factors), in the order they apply; seeds seed + 1, ...
    augmentations = (
        ("rotate", keras.layers.RandomRotation, (config.augment_rotation / 360.0,)),
        ("zoom", keras.layers.RandomZoom, (config.augment_zoom,)),
        ("shift", keras.layers.RandomTranslation, (config.augment_shift,) * 2),
    )
    layers = [keras.Input(shape=tuple(image_shape))]
    for offset, (name, layer, factors) in enumerate(augmentations, start=1):
        if factors[0]:
            layers.append(
                layer(
                    *factors,
                    fill_mode="nearest",
                    seed=config.seed + offset,
                    name=name,
                )
            )
    return keras.Sequential(layers, name="augment")


def _training_dataset(
    images: np.ndarray, labels: np.ndarray, config: TrainConfig
) -> tf.data.Dataset:
    """Shuffled (seeded, reshuffled each epoch) batches (float32 images, labels)."""
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    dataset = dataset.shuffle(
        len(images), seed=config.seed, reshuffle_each_iteration=True
    )
    # Whole batches only (batch norm dislikes tiny last batches), unless the
    # data set is smaller than one batch.
    dataset = dataset.batch(
        config.batch_size, drop_remainder=len(images) >= config.batch_size
    )
    return dataset.map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(2)


def train_classifier(
    images: np.ndarray, labels: np.ndarray, num_classes: int, config: TrainConfig
) -> TrainedClassifier:
    """Fits backbone + linear softmax head on the meta-train images.

    Args:
      images: uint8 [n, H, W, C], meta-train images only.
      labels: int [n], class index in [0, num_classes).
      num_classes: number of meta-train classes (the head's width).
      config: see TrainConfig.

    Returns:
      TrainedClassifier; with `config.epochs` 0, its networks as initialised
      (seeded), for the episodes to train.
    """
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), found "
            f"[{labels.min()}, {labels.max()}]"
        )
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()

    image_shape = images.shape[1:]
    mean, variance = pixel_statistics(images)
    extractor = build_feature_extractor(config, image_shape, mean, variance)
    inputs = keras.Input(shape=image_shape, name="images")
    features = extractor(build_augmentation(config, image_shape)(inputs))
    logits = keras.layers.Dense(num_classes, name="head")(features)
    classifier = keras.Model(inputs, logits, name="classifier")

    dataset = _training_dataset(images, labels.astype(np.int32), config)
    steps = max(1, config.epochs * int(dataset.cardinality()))
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, steps)
    classifier.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=config.label_smoothing
        ),
        metrics=["accuracy"],
    )

    def log_epoch(epoch, logs):
        logging.info(
            "embedding training epoch %d/%d: loss %.4f, accuracy %.4f",
            epoch + 1,
            config.epochs,
            logs["loss"],
            logs["accuracy"],
        )

    history = {"loss": [], "accuracy": []}
    if config.epochs:  # 0: the episodes alone train the network (episodic.py)
        one_hot = dataset.map(lambda x, y: (x, tf.one_hot(y, num_classes)))
        fitted = classifier.fit(
            one_hot,
            epochs=config.epochs,
            verbose=0,
            shuffle=False,  # `dataset` is already shuffled, seeded
            callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=log_epoch)],
        )
        history = {k: [float(v) for v in fitted.history[k]] for k in history}
    return TrainedClassifier(extractor, classifier, history)


def extract_features(
    extractor: keras.Model,
    images: np.ndarray,
    batch_size: int = 256,
    view_shifts: int = 0,
) -> np.ndarray:
    """Embeds images in inference mode, each as the mean over its shifted views.

    Args:
      extractor: from `train_classifier`.
      images: uint8 [n, H, W, C].
      batch_size: images per forward pass.
      view_shifts: s; the features are averaged over the (2s+1)^2 views of
        `shifted_views` (0: the image alone).

    Returns:
      float32 [n, D].
    """
    embed = tf.function(lambda x: extractor(tf.cast(x, tf.float32), training=False))
    total = 0.0
    for view in shifted_views(images, view_shifts):
        dataset = tf.data.Dataset.from_tensor_slices(view).batch(batch_size)
        total = total + np.concatenate([embed(batch).numpy() for batch in dataset])
    return (total / (2 * view_shifts + 1) ** 2).astype(np.float32)


def shifted_views(images: np.ndarray, shift: int):
    """The copies of images shifted by dy, dx in -shift..shift pixels.

    View (dy, dx) has pixel [i, j] = image[i - dy, j - dx], indices clipped
    to the image (its edge pixels repeated). Yields (2 shift + 1)^2 arrays of
    the shape of images, uint8 [n, H, W, C], dy-major; with shift 0, the
    images themselves.
    """
    height, width = images.shape[1:3]
    padded = np.pad(
        images, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge"
    )
    for top in range(2 * shift, -1, -1):
        for left in range(2 * shift, -1, -1):
            yield padded[:, top : top + height, left : left + width]
