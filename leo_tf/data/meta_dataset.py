"""The episode samplers of a run's splits, from a DataConfig.

Meta-training episodes have V = num_val_examples_per_class query examples per
class; meta-validation and meta-test episodes use all remaining examples of
each class, V = min(total_examples_per_class, smallest class) - K.
"""

import os

from absl import logging

from leo_tf.data import embeddings, episodes, split_overlap, synthetic

# The data sets known without looking under data_path.
KNOWN_DATASETS = ("miniImageNet", "tieredImageNet", "synthetic")
# The published embeddings are 640-d; other data sets give their own width.
_EMBEDDING_DIMS = {"miniImageNet": 640, "tieredImageNet": 640, "synthetic": 640}

# Sampler streams: one per split, so that splits never share random numbers.
_STREAMS = {"train": 0, "val": 1, "test": 2}


def load_classes(data_config, split, embedding_dim=None):
    """The ClassEmbeddings of `split` ("train", "val" or "test").

    The built-in synthetic set is generated under data_path on first use.
    embedding_dim: the width D the file must have; by default 640 for the
    published data sets and the synthetic one, any for others.
    Unless data_config.allow_split_overlap, `check_disjoint_splits` refuses
    a split that shares classes or examples with another.
    """
    check_dataset_name(data_config)
    if data_config.dataset_name == "synthetic":
        synthetic.ensure_synthetic(data_config.data_path)
    classes = embeddings.load_split(
        data_config.data_path,
        data_config.dataset_name,
        data_config.embedding_crop,
        split,
        train_on_val=data_config.train_on_val and split == "train",
        embedding_dim=embedding_dim or _EMBEDDING_DIMS.get(data_config.dataset_name),
    )
    if not data_config.allow_split_overlap:
        check_disjoint_splits(data_config, split, classes)
    return classes


def available_datasets(data_path):
    """The built-in data set names plus the directories under data_path."""
    custom = []
    if data_path and os.path.isdir(data_path):
        custom = sorted(
            entry
            for entry in os.listdir(data_path)
            if os.path.isdir(os.path.join(data_path, entry))
            and entry not in KNOWN_DATASETS
            and not entry.startswith(".")
        )
    return (*KNOWN_DATASETS, *custom)


def check_dataset_name(data_config):
    """Raises DataError naming --dataset_name unless it is a built-in data set
    or a directory under data_path."""
    available = available_datasets(data_config.data_path)
    name = data_config.dataset_name
    if name not in available:
        expected = embeddings.split_path(
            data_config.data_path, name, data_config.embedding_crop, "train"
        )
        raise embeddings.DataError(
            f"--dataset_name={name}: neither built in nor a directory under "
            f"--data_path={data_config.data_path} (expected {expected}, ...; "
            "python -m leo_tf.embed makes them from images); available: "
            + ", ".join(available)
        )


def check_disjoint_splits(data_config, split, classes):
    """Refuses `classes`, just read for `split`, if they share a class or an
    identical example with another split.

    Every pair of splits must be disjoint, except train and val with
    train_on_val (val is then trained on). The other splits' files are read
    once per process (see split_overlap); one that does not exist is left
    to its own loading to report.

    Raises:
      DataError: naming both files and the shared classes or examples.
    """

    def path(name):
        return embeddings.split_path(
            data_config.data_path,
            data_config.dataset_name,
            data_config.embedding_crop,
            name,
        )

    if split == "train" and data_config.train_on_val:
        mine = split_overlap.fingerprint(classes)  # train + val
    else:
        mine = split_overlap.file_fingerprint(path(split), classes)
    for other in embeddings.SPLITS:
        allowed = data_config.train_on_val and {split, other} == {"train", "val"}
        if other == split or allowed or not os.path.exists(path(other)):
            continue
        theirs = split_overlap.file_fingerprint(path(other))
        # The later split of the pair (val, test) is named first.
        if embeddings.SPLITS.index(split) > embeddings.SPLITS.index(other):
            split_overlap.check_disjoint(split, mine, other, theirs)
        else:
            split_overlap.check_disjoint(other, theirs, split, mine)


def train_sampler(data_config, classes, seed, stream_offset=0):
    """The meta-training sampler: metatrain_batch_size episodes per batch."""
    return episodes.EpisodeSampler(
        classes,
        num_classes=data_config.num_classes,
        num_tr_examples_per_class=data_config.num_tr_examples_per_class,
        num_val_examples_per_class=data_config.num_val_examples_per_class,
        batch_size=data_config.metatrain_batch_size,
        seed=seed,
        stream=_STREAMS["train"] + stream_offset,
        split="train",
    )


def eval_sampler(data_config, classes, split, seed):
    """The meta-validation or meta-test sampler, with all remaining examples."""
    num_val = episodes.eval_num_val_examples(
        classes,
        data_config.num_tr_examples_per_class,
        data_config.total_examples_per_class,
    )
    full = data_config.total_examples_per_class - data_config.num_tr_examples_per_class
    if num_val < full:
        logging.info(
            "%s split: smallest class has %d examples, so %s episodes use "
            "%d query examples per class (all remaining after K=%d), not %d",
            split,
            classes.min_examples_per_class,
            split,
            num_val,
            data_config.num_tr_examples_per_class,
            full,
        )
    batch_size = (
        data_config.metavalid_batch_size
        if split == "val"
        else data_config.metatest_batch_size
    )
    return episodes.EpisodeSampler(
        classes,
        num_classes=data_config.num_classes,
        num_tr_examples_per_class=data_config.num_tr_examples_per_class,
        num_val_examples_per_class=num_val,
        batch_size=batch_size,
        seed=seed,
        stream=_STREAMS[split],
        split=split,
    )
