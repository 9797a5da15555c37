"""Small synthetic datasets written with the real writer: for examples, tests and benchmarks
that need a dataset in seconds and no download."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cifar5m.shards.shard import Sample
from cifar5m.shards.writer import DatasetWriter


def synthetic_images(n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` smooth-ish random 32x32 RGB uint8 images (8x8 blocks: they compress like photos,
    unlike pure noise)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)


def write_synthetic_dataset(root: str | os.PathLike, *, n_train: int = 200, n_test: int = 50,
                            shard_size: int = 64, image_format: str = "png", seed: int = 0) -> Path:
    """Write a dataset whose train keys are ``t000000..`` and test keys ``v000000..``.

    Image i of train is ``synthetic_images(n_train + n_test, seed=seed)[i]``, label ``i % 10``;
    the test images follow the train ones in the same array.
    """
    images = synthetic_images(n_train + n_test, seed=seed)
    with DatasetWriter(root, fingerprint={"test": seed}, image_format=image_format,
                       shard_size=shard_size, provenance={"source": "synthetic test data"}) as w:
        for i in range(n_train):
            w.add("train", Sample(f"t{i:06d}", images[i], i % 10, confidence=0.9, seed=i))
        for j in range(n_test):
            w.add("test", Sample(f"v{j:06d}", images[n_train + j], j % 10))
    return Path(root)
