"""A split's index as flat numpy arrays: where every sample's bytes lie, and its label.

Built once in the main process from ``index.parquet``; DataLoader workers inherit it
(fork) or unpickle it (spawn). Plain arrays instead of Python lists because 5M keys
as ``str`` objects cost ~350 MB and copy-on-write touches them all on fork; as
fixed-width bytes they are ~40 MB and never copied.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from cifar5m.errors import SampleNotFoundError
from shards.reader import Dataset


@dataclass
class Catalog:
    url: str
    split: str
    image_format: str
    class_names: tuple[str, ...]
    shards: list[str]  # shard files of the split, in order
    shard_bytes: np.ndarray  # sizes the manifest records
    shard_sha: list[str]
    shard_start: np.ndarray  # first split position of each shard
    shard_id: np.ndarray  # int32, per position
    image_offset: np.ndarray  # int64, data offset of the image member in its shard
    image_size: np.ndarray  # int64
    labels: np.ndarray  # int64
    keys: np.ndarray  # fixed-width bytes

    @classmethod
    def from_dataset(cls, dataset: Dataset, split: str) -> Catalog:
        if split not in dataset.manifest.splits:
            raise SampleNotFoundError(
                f"{dataset.url} has no split {split!r}; it has {dataset.manifest.splits}")
        infos = dataset.manifest.split_shards(split)
        table = dataset.index.filter(pc.equal(dataset.index["split"], split)).sort_by("position")
        names = [s.file for s in infos]
        lookup = {name: i for i, name in enumerate(names)}
        encoded = pc.dictionary_encode(table["shard"]).combine_chunks()
        remap = np.array([lookup[n] for n in encoded.dictionary.to_pylist()], np.int32)
        shard_id = remap[encoded.indices.to_numpy(zero_copy_only=False)] if len(table) else \
            np.zeros(0, np.int32)
        counts = np.bincount(shard_id, minlength=len(names))
        return cls(
            url=dataset.url, split=split, image_format=dataset.manifest.image_format,
            class_names=tuple(dataset.manifest.class_names), shards=names,
            shard_bytes=np.array([s.bytes for s in infos], np.int64),
            shard_sha=[s.sha256 for s in infos],
            shard_start=(np.cumsum(counts) - counts).astype(np.int64),
            shard_id=shard_id,
            image_offset=table["image_offset"].to_numpy().astype(np.int64),
            image_size=table["image_size"].to_numpy().astype(np.int64),
            labels=table["label"].to_numpy().astype(np.int64),
            keys=np.asarray(table["key"].to_numpy(zero_copy_only=False).astype(str)).astype(np.bytes_),
        )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def counts(self) -> list[int]:
        """Samples per shard, in split order."""
        return np.bincount(self.shard_id, minlength=len(self.shards)).tolist()

    def key_list(self, positions: np.ndarray) -> list[str]:
        return [k.decode() for k in self.keys[positions].tolist()]

    def fingerprint(self) -> str:
        """Identifies the split's content (shard checksums): saved in stream states."""
        h = hashlib.sha256(self.split.encode())
        for name, sha in zip(self.shards, self.shard_sha, strict=True):
            h.update(f"{name}:{sha};".encode())
        return h.hexdigest()[:16]
