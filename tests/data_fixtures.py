"""Small embedding pickles in the authors' format, written by the tests."""

import pickle

import numpy as np


def write_toy_dataset(
    data_path,
    name="toy",
    classes=(12, 6, 6),
    examples=24,
    dim=16,
    seed=0,
    crop="center",
):
    """Writes train/val/test pickles under data_path/name/crop; returns data_path.

    Each class is a random mean in a 4-d subspace plus isotropic noise, so the
    classes are learnable but not trivially separable.
    """
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(4, dim))
    root = data_path / name / crop
    root.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "val", "test"), classes):
        embeddings, keys = [], []
        for index in range(count):
            class_id = f"n{split[:2]}{index:05d}"
            mean = rng.normal(size=4) * 1.5
            for example in range(examples):
                signal = (mean + 0.7 * rng.normal(size=4)) @ basis
                embeddings.append(np.maximum(signal + rng.normal(size=dim), 0))
                keys.append(f"{name}-{class_id}-{class_id}_{example:04d}.JPEG")
        payload = {
            "embeddings": np.asarray(embeddings, np.float32),
            "keys": np.asarray(keys),
            "labels": np.repeat(np.arange(count), examples),
        }
        with open(root / f"{split}_embeddings.pkl", "wb") as stream:
            pickle.dump(payload, stream, protocol=2)
    return data_path
