"""Class-level meta-train / meta-validation / meta-test splits.

The split is CLEAN: every class belongs to exactly one of train, val, test,
and only the train classes are used to fit the embedding network, so no
meta-validation or meta-test class (nor any image of one) is seen in training.

Rules:
* `omniglot_split` (Omniglot's standard protocol, Lake et al. 2015): the 20
    "evaluation" alphabets are meta-test; of the 30 "background" alphabets,
    `num_val_alphabets` whole alphabets, drawn with `seed`, are meta-validation
    and the rest meta-train. Alphabets are never divided between splits.
* `random_split`: a seeded permutation of the sorted class names, cut into
    train / val / test by counts or fractions.

`add_rotations` optionally adds each class's 90/180/270-degree rotations as
new classes in the same split (Vinyals et al. 2016), so splits stay disjoint.
"""

import dataclasses
from typing import Dict, Tuple

import numpy as np

from leo_tf.data import embeddings as embeddings_lib
from leo_tf.embedding import images as images_lib

SPLITS = embeddings_lib.SPLITS

# Omniglot's 30 "background" and 20 "evaluation" alphabets (folder names).
BACKGROUND_ALPHABETS = (
    "Alphabet_of_the_Magi",
    "Anglo-Saxon_Futhorc",
    "Arcadian",
    "Armenian",
    "Asomtavruli_(Georgian)",
    "Balinese",
    "Bengali",
    "Blackfoot_(Canadian_Aboriginal_Syllabics)",
    "Braille",
    "Burmese_(Myanmar)",
    "Cyrillic",
    "Early_Aramaic",
    "Futurama",
    "Grantha",
    "Greek",
    "Gujarati",
    "Hebrew",
    "Inuktitut_(Canadian_Aboriginal_Syllabics)",
    "Japanese_(hiragana)",
    "Japanese_(katakana)",
    "Korean",
    "Latin",
    "Malay_(Jawi_-_Arabic)",
    "Mkhedruli_(Georgian)",
    "N_Ko",
    "Ojibwe_(Canadian_Aboriginal_Syllabics)",
    "Sanskrit",
    "Syriac_(Estrangelo)",
    "Tagalog",
    "Tifinagh",
)
EVALUATION_ALPHABETS = (
    "Angelic",
    "Atemayar_Qelisayer",
    "Atlantean",
    "Aurek-Besh",
    "Avesta",
    "Ge_ez",
    "Glagolitic",
    "Gurmukhi",
    "Kannada",
    "Keble",
    "Malayalam",
    "Manipuri",
    "Mongolian",
    "Old_Church_Slavonic_(Cyrillic)",
    "Oriya",
    "Sylheti",
    "Syriac_(Serto)",
    "Tengwar",
    "Tibetan",
    "ULOG",
)

_ROTATIONS = (1, 2, 3)  # quarter turns added by `add_rotations`


class SplitError(ValueError):
    """A class split cannot be made as asked."""


@dataclasses.dataclass(frozen=True)
class ClassSplit:
    """Class names per split, each tuple sorted; `rule` says how it was made."""

    train: Tuple[str, ...]
    val: Tuple[str, ...]
    test: Tuple[str, ...]
    rule: str

    def __post_init__(self):
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = set(getattr(self, a)) & set(getattr(self, b))
            if shared:
                raise SplitError(f"classes in both {a} and {b}: {sorted(shared)[:5]}")

    def classes(self, split: str) -> Tuple[str, ...]:
        return getattr(self, split)


def _class_groups(class_names: np.ndarray, groups: np.ndarray) -> Dict[str, str]:
    """{class name: its group}; raises if a class spans two groups."""
    mapping = {}
    for name, group in zip(class_names.tolist(), groups.tolist()):
        if mapping.setdefault(name, group) != group:
            raise SplitError(
                f"class {name!r} is in two groups, {mapping[name]!r} and {group!r}"
            )
    return mapping


def omniglot_split(
    class_names: np.ndarray, groups: np.ndarray, num_val_alphabets: int, seed: int
) -> ClassSplit:
    """Omniglot's background/evaluation split with held-out val alphabets.

    Args:
      class_names: str [n], class of each image.
      groups: str [n], alphabet of each image; all must be Omniglot alphabets.
      num_val_alphabets: how many of the background alphabets present become
        meta-validation (whole alphabets).
      seed: seeds the choice of validation alphabets.

    Returns:
      ClassSplit: train = remaining background alphabets' classes, val = the
      drawn background alphabets' classes, test = evaluation alphabets' classes.
    """
    class_to_alphabet = _class_groups(class_names, groups)
    alphabets = set(class_to_alphabet.values())
    if alphabets == {""}:
        raise SplitError(
            "--class_split=omniglot needs each class's alphabet, and these "
            "images have no groups: read Omniglot's folders with "
            "--image_dir_layout=group/class (alphabet/character), or choose "
            "--class_split=random"
        )
    unknown = alphabets - set(BACKGROUND_ALPHABETS) - set(EVALUATION_ALPHABETS)
    if unknown:
        raise SplitError(
            f"--class_split=omniglot needs Omniglot alphabet names as groups; "
            f"unknown: {sorted(unknown)[:5]}"
        )
    background = sorted(alphabets & set(BACKGROUND_ALPHABETS))
    if not 0 < num_val_alphabets < len(background):
        raise SplitError(
            f"--num_val_alphabets={num_val_alphabets}: need at least 1 and fewer "
            f"than the {len(background)} background alphabets present"
        )
    rng = np.random.default_rng(seed)
    val_alphabets = set(rng.choice(background, num_val_alphabets, replace=False))
    by_split = {split: [] for split in SPLITS}
    for name, alphabet in class_to_alphabet.items():
        if alphabet in EVALUATION_ALPHABETS:
            by_split["test"].append(name)
        elif alphabet in val_alphabets:
            by_split["val"].append(name)
        else:
            by_split["train"].append(name)
    rule = (
        f"omniglot: background alphabets -> train/val, evaluation alphabets "
        f"-> test; val alphabets (seed {seed}): "
        f"{', '.join(sorted(val_alphabets))}"
    )
    return ClassSplit(*(tuple(sorted(by_split[s])) for s in SPLITS), rule=rule)


def parse_split_sizes(text: str, num_classes: int) -> Tuple[int, int, int]:
    """Class counts (train, val, test) from "a,b,c" counts or fractions.

    Args:
      text: three integers summing to `num_classes` (e.g. "64,16,20"), or three
        fractions summing to 1 (e.g. "0.64,0.16,0.2"); val and test counts are
        rounded and train takes the rest.
      num_classes: how many classes there are.

    Returns:
      (num_train, num_val, num_test), each at least 1, summing to num_classes.
    """
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise SplitError(f"--split_sizes={text!r}: expected three numbers")
    if all(p.isdigit() for p in parts):
        counts = tuple(int(p) for p in parts)
        if sum(counts) != num_classes:
            raise SplitError(
                f"--split_sizes={text!r}: counts sum to {sum(counts)}, but there "
                f"are {num_classes} classes"
            )
    else:
        try:
            fractions = [float(p) for p in parts]
        except ValueError as error:
            raise SplitError(f"--split_sizes={text!r}: {error}") from error
        if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
            raise SplitError(
                f"--split_sizes={text!r}: fractions must be >= 0 and sum to 1"
            )
        num_val = int(round(fractions[1] * num_classes))
        num_test = int(round(fractions[2] * num_classes))
        counts = (num_classes - num_val - num_test, num_val, num_test)
    if min(counts) < 1:
        raise SplitError(
            f"--split_sizes={text!r} gives {counts} classes for {num_classes} "
            "classes; every split needs at least one"
        )
    return counts


def random_split(class_names: np.ndarray, sizes: str, seed: int) -> ClassSplit:
    """A seeded class-level split.

    Args:
      class_names: str [n], class of each image.
      sizes: see `parse_split_sizes`.
      seed: seeds the permutation of the sorted class names.

    Returns:
      ClassSplit with the first, next and last classes of the permutation.
    """
    names = sorted(set(class_names.tolist()))
    num_train, num_val, _ = parse_split_sizes(sizes, len(names))
    permuted = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    train = permuted[:num_train]
    val = permuted[num_train : num_train + num_val]
    test = permuted[num_train + num_val :]
    rule = (
        f"random: seeded (seed {seed}) class permutation cut into "
        f"{num_train}/{num_val}/{len(test)} classes"
    )
    return ClassSplit(
        tuple(sorted(train)), tuple(sorted(val)), tuple(sorted(test)), rule=rule
    )


def apply_split(
    image_set: images_lib.ImageSet, class_split: ClassSplit
) -> Dict[str, images_lib.ImageSet]:
    """{split: its images}, rows grouped by sorted class name.

    Within a class, rows keep their order in `image_set`. Every image's class
    must be in the split.
    """
    assigned = set(class_split.train + class_split.val + class_split.test)
    missing = set(image_set.class_names.tolist()) - assigned
    if missing:
        raise SplitError(f"classes in no split: {sorted(missing)[:5]}")
    result = {}
    for split in SPLITS:
        rows = np.flatnonzero(
            np.isin(image_set.class_names, class_split.classes(split))
        )
        order = np.argsort(image_set.class_names[rows], kind="stable")
        result[split] = image_set.take(rows[order])
    return result


def add_rotations(image_set: images_lib.ImageSet) -> images_lib.ImageSet:
    """Adds each class's 90/180/270-degree rotations as new classes.

    Args:
      image_set: images uint8 [n, S, S, C] (square).

    Returns:
      ImageSet with 4n rows: the originals and, for each quarter turn k, the
      images rotated counter-clockwise by k*90 degrees with class name
      "<class>/rot<k*90>" (e.g. "Latin/character01/rot090"), same group;
      grouped by sorted class name.
    """
    height, width = image_set.images.shape[1:3]
    if height != width:
        raise SplitError(f"--rotations needs square images, found {height}x{width}")
    parts = [image_set]
    for quarter_turns in _ROTATIONS:
        parts.append(
            images_lib.ImageSet(
                np.ascontiguousarray(
                    np.rot90(image_set.images, quarter_turns, axes=(1, 2))
                ),
                np.char.add(image_set.class_names, f"/rot{90 * quarter_turns:03d}"),
                image_set.groups,
            )
        )
    rotated = images_lib.concatenate(parts)
    return rotated.take(np.argsort(rotated.class_names, kind="stable"))
