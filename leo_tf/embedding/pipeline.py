"""The whole embedding run: source -> class split -> train -> embed -> write.

`run(EmbedConfig)` reads the images of one source, splits the CLASSES into
meta-train / meta-validation / meta-test (splits.py; clean: the embedding
network and its softmax head are fitted on the meta-train classes' images
only), optionally adds rotated classes, trains the network (pretrain.py, then
optionally episodic.py),
embeds every image of every split in inference mode (optionally as the mean
over its shifted views, `--view_shifts`) and writes
`<data_path>/<dataset_name>/<embedding_crop>/{train,val,test}_embeddings.pkl`
and `classes.json` (writer.py). That folder is checked first, before any
image is read: it must be writable, and files of an earlier run there are
replaced only with --overwrite.
"""

import collections
import dataclasses
import logging
import os
import time
from typing import Dict, Tuple

import numpy as np

from leo_tf.data import embeddings as embeddings_lib
from leo_tf.embedding import episodic
from leo_tf.embedding import images as images_lib
from leo_tf.embedding import pretrain
from leo_tf.embedding import splits as splits_lib
from leo_tf.embedding import writer
from leo_tf.embedding.options import (
    CONV4_MIN_IMAGE_SIZE,
    EmbedConfig,
    SourceConfig,
    SplitConfig,
)


@dataclasses.dataclass
class SplitSummary:
    """One written split.

    Attributes:
      path: the pickle.
      class_ids: class ids in label order (label i is class_ids[i]).
      class_names: the source class names, same order.
      counts: images per class, same order.
    """

    path: str
    class_ids: Tuple[str, ...]
    class_names: Tuple[str, ...]
    counts: Tuple[int, ...]

    @property
    def num_images(self) -> int:
        return int(sum(self.counts))


@dataclasses.dataclass
class EmbedResult:
    """What `run` did.

    Attributes:
      splits: {"train"|"val"|"test": SplitSummary}.
      head_class_ids: class ids of the softmax head's outputs, in order (the
        classes the network was trained on).
      split_rule: how classes were split, in words.
      embedding_dim: D.
      seconds: wall time per stage ("load", "train", ["episodic",] "embed",
        "write").
      history: per-epoch training loss / accuracy (and, with episodic
        fine-tuning, episodic.finetune's history).
      classes_path: the classes.json file.
    """

    splits: Dict[str, SplitSummary]
    head_class_ids: Tuple[str, ...]
    split_rule: str
    embedding_dim: int
    seconds: Dict[str, float]
    history: Dict[str, list]
    classes_path: str


def load_images(config: SourceConfig) -> images_lib.ImageSet:
    """Reads the configured image source (see images.py)."""
    if config.packed_omniglot:
        return images_lib.load_packed_omniglot(
            config.packed_omniglot, config.image_size, config.channels
        )
    if config.image_dir:
        return images_lib.load_image_folder(
            config.image_dir,
            config.image_dir_layout,
            config.image_size,
            config.channels,
        )
    return images_lib.load_tfds(
        config.tfds_name,
        config.tfds_splits,
        config.tfds_data_dir or None,
        config.tfds_download,
        config.image_size,
        config.channels,
    )


def split_classes(
    image_set: images_lib.ImageSet, source: SourceConfig, config: SplitConfig
) -> splits_lib.ClassSplit:
    """The class split that `config` asks for."""
    rule = config.class_split
    if rule == "auto":
        rule = "omniglot" if source.is_omniglot else "random"
    if rule == "omniglot":
        return splits_lib.omniglot_split(
            image_set.class_names,
            image_set.groups,
            config.num_val_alphabets,
            config.split_seed,
        )
    return splits_lib.random_split(
        image_set.class_names, config.split_sizes, config.split_seed
    )


def _class_blocks(class_names: np.ndarray):
    """(names, counts, labels [n]) of rows grouped by class, in row order."""
    names, starts, counts = np.unique(
        class_names, return_index=True, return_counts=True
    )
    order = np.argsort(starts)
    names, counts = names[order], counts[order]
    labels = np.repeat(np.arange(len(names)), counts)
    if not np.array_equal(np.repeat(names, counts), class_names):
        raise AssertionError("rows are not grouped by class")
    return names.tolist(), counts.tolist(), labels


def describe_counts(split: str, counts) -> str:
    """One line: classes, images, and a histogram of images per class."""
    histogram = ", ".join(
        f"{c} classes x {n} images"
        for n, c in sorted(collections.Counter(counts).items())
    )
    return (
        f"{split}: {len(counts)} classes, {sum(counts)} images "
        f"(per class: {histogram})"
    )


def _write_outputs(
    config: EmbedConfig,
    class_split: splits_lib.ClassSplit,
    by_split,
    blocks,
    ids,
    embeddings,
) -> Tuple[dict, str]:
    """Writes the three pickles and classes.json.

    Args:
      config: the run's configuration.
      class_split: the class split (its rule is recorded).
      by_split: {split: ImageSet}, rows grouped by class.
      blocks: {split: (class names, counts, labels [n])} from `_class_blocks`.
      ids: {split: class ids in label order}.
      embeddings: {split: float32 [n, D]}.

    Returns:
      ({split: SplitSummary}, path of classes.json).
    """
    output = config.output
    # Again: another run may have written there while this one trained.
    output.check_folder()
    with writer.FileSet() as files:
        summaries, classes_path = _stage_outputs(
            files, config, class_split, by_split, blocks, ids, embeddings
        )
        files.commit()
    return summaries, classes_path


def _stage_outputs(files, config, class_split, by_split, blocks, ids, embeddings):
    """_write_outputs' files, added to `files`; the same return value."""
    output = config.output
    summaries, classes = {}, {}
    for split in splits_lib.SPLITS:
        names, counts, labels = blocks[split]
        row_ids = np.array(ids[split])[labels]
        path = str(
            embeddings_lib.split_path(
                output.data_path, output.dataset_name, output.embedding_crop, split
            )
        )
        writer.write_split(
            files,
            path,
            embeddings[split],
            writer.make_keys(output.dataset_name, row_ids),
            labels,
        )
        summaries[split] = SplitSummary(
            path, ids[split], tuple(names), tuple(int(c) for c in counts)
        )
        group_of = dict(
            zip(by_split[split].class_names.tolist(), by_split[split].groups.tolist())
        )
        for label, (class_id, name, count) in enumerate(zip(ids[split], names, counts)):
            classes[class_id] = {
                "name": name,
                "group": group_of[name],
                "split": split,
                "label": label,
                "num_images": int(count),
            }
    classes_path = os.path.join(os.path.dirname(path), writer.CLASSES_FILE)
    writer.write_json(
        files,
        classes_path,
        {
            "dataset_name": output.dataset_name,
            "embedding_crop": output.embedding_crop,
            "embedding_dim": int(embeddings["train"].shape[1]),
            "view_shifts": output.view_shifts,
            "split_rule": class_split.rule,
            "head_class_ids": list(ids["train"]),
            "config": {
                "source": dataclasses.asdict(config.source),
                "split": dataclasses.asdict(config.split),
                "train": dataclasses.asdict(config.train),
            },
            "classes": classes,
        },
    )
    return summaries, classes_path


def _check_images_fit(image_set, backbone):
    """ImageSourceError, naming --image_size, if the images read are too small
    for conv4 (its four 2x2 poolings need 16x16)."""
    height, width = image_set.images.shape[1:3]
    least = CONV4_MIN_IMAGE_SIZE
    if backbone == "conv4" and min(height, width) < least:
        raise images_lib.ImageSourceError(
            f"--backbone=conv4 needs images of at least {least}x{least}, but "
            f"the images read are {height}x{width}; pass --image_size={least} "
            "or more to resize them"
        )


def _check_view_shifts(by_split, shifts):
    """ImageSourceError, naming --view_shifts, before any training: a shift
    of a whole image side (its views would hold only edge pixels), or views
    of the largest split (`pretrain.shifted_views`: the split padded by
    `shifts` pixels a side, and a view's copy) that do not fit in memory
    beside the images held."""
    if not shifts:
        return
    largest = max(by_split.values(), key=lambda s: s.num_images).images
    count, height, width, channels = largest.shape
    if shifts >= min(height, width):
        raise images_lib.ImageSourceError(
            f"--view_shifts={shifts}: must be less than the images' side (they "
            f"are {height}x{width}): a view shifted by a whole side holds only "
            "edge pixels"
        )
    padded = count * (height + 2 * shifts) * (width + 2 * shifts) * channels
    held = sum(s.images.nbytes for s in by_split.values())
    images_lib.check_memory(
        held + padded + largest.nbytes,
        f"--view_shifts={shifts}: the images and the views of the largest "
        f"split ({count} images padded to {height + 2 * shifts}x"
        f"{width + 2 * shifts})",
        "lower --view_shifts",
    )


def run(config: EmbedConfig) -> EmbedResult:
    """Makes and writes the embeddings. See the module docstring.

    Returns:
      EmbedResult.

    Raises:
      writer.OutputError: before any image is read, if the output folder
        cannot be written or holds an earlier run's files without --overwrite.
    """
    config.output.check_folder()
    seconds = {}
    start = time.perf_counter()
    image_set = load_images(config.source)
    seconds["load"] = time.perf_counter() - start
    logging.info(
        "read %d images of shape %s", image_set.num_images, image_set.images.shape[1:]
    )
    _check_images_fit(image_set, config.train.backbone)

    class_split = split_classes(image_set, config.source, config.split)
    logging.info("class split: %s", class_split.rule)
    by_split = splits_lib.apply_split(image_set, class_split)
    empty = [s for s in splits_lib.SPLITS if not by_split[s].num_images]
    if empty:
        raise splits_lib.SplitError(
            f"no classes in split(s) {empty} ({class_split.rule}); every split "
            "needs at least one class"
        )
    if config.split.rotations:
        by_split = {
            s: splits_lib.add_rotations(v) if s in config.split.rotation_splits else v
            for s, v in by_split.items()
        }
    _check_view_shifts(by_split, config.output.view_shifts)

    # Class ids are numbered over train, then val, then test classes.
    blocks = {s: _class_blocks(by_split[s].class_names) for s in splits_lib.SPLITS}
    all_ids = writer.make_class_ids(
        config.output.dataset_name, sum(len(blocks[s][0]) for s in blocks)
    )
    ids, offset = {}, 0
    for split in splits_lib.SPLITS:
        ids[split] = tuple(all_ids[offset : offset + len(blocks[split][0])])
        offset += len(ids[split])
        logging.info(describe_counts(split, blocks[split][1]))
    logging.info(
        "the embedding network is trained on the %d train classes only",
        len(ids["train"]),
    )

    train_names, train_counts, train_labels = blocks["train"]
    if config.train.episodic_episodes:
        episodic.check_episodes_fit(train_counts, config.train)
    start = time.perf_counter()
    trained = pretrain.train_classifier(
        by_split["train"].images, train_labels, len(train_names), config.train
    )
    seconds["train"] = time.perf_counter() - start
    if config.train.episodic_episodes:
        start = time.perf_counter()
        trained.history.update(
            episodic.finetune(
                trained.extractor,
                by_split["train"].images,
                train_labels,
                len(train_names),
                config.train,
            )
        )
        seconds["episodic"] = time.perf_counter() - start

    start = time.perf_counter()
    shifts = config.output.view_shifts
    if shifts:
        logging.info(
            "each image embedded as the mean over its %d views shifted by up to "
            "%d pixel(s)",
            (2 * shifts + 1) ** 2,
            shifts,
        )
    embeddings = {
        s: pretrain.extract_features(
            trained.extractor, by_split[s].images, view_shifts=shifts
        )
        for s in splits_lib.SPLITS
    }
    seconds["embed"] = time.perf_counter() - start

    start = time.perf_counter()
    summaries, classes_path = _write_outputs(
        config, class_split, by_split, blocks, ids, embeddings
    )
    seconds["write"] = time.perf_counter() - start
    return EmbedResult(
        summaries,
        ids["train"],
        class_split.rule,
        int(embeddings["train"].shape[1]),
        seconds,
        trained.history,
        classes_path,
    )
