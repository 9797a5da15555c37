"""A split's index as flat numpy arrays: where every sample's bytes lie, and its label.

Built once in the main process from ``index.parquet``; DataLoader workers inherit it
(fork) or unpickle it (spawn). Plain arrays instead of Python lists because 5M keys
as ``str`` objects cost ~350 MB and copy-on-write touches them all on fork; as
fixed-width bytes they are ~40 MB and never copied.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cifar5m.errors import (
    DatasetNotFoundError,
    ManifestError,
    SampleNotFoundError,
    ShardNotFoundError,
)
from shards import checksum
from shards.format import INDEX_NAME, MANIFEST_NAME
from shards.index import read_index, shard_runs
from shards.manifest import Manifest, read_manifest_text
from shards.reader import check_file
from shards.source import Source

_COLUMNS = ("key", "split", "shard", "position", "image_offset", "image_size", "label", checksum.COLUMN,
            checksum.GROUP_COLUMN)


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
    shard_count: np.ndarray  # int64, samples of each shard
    shard_id: np.ndarray  # int32, per position
    image_offset: np.ndarray  # int64, data offset of the image member in its shard
    image_size: np.ndarray  # int64
    labels: np.ndarray  # int64
    keys: np.ndarray  # fixed-width bytes
    digests: np.ndarray | None = None  # uint64 XXH3 of each image member; None: an older index
    group_digests: np.ndarray | None = None  # uint64 XXH3 of each row's group (shards.checksum)

    @classmethod
    def load(cls, source: Source, split: str) -> Catalog:
        """Read manifest and index through ``source``: each is fetched whole (one GET), so any
        static HTTP server works, also one without Range support (pyarrow's random reads
        of a remote parquet file need Range)."""
        where = f"{source.url}/{MANIFEST_NAME}"
        try:
            manifest = read_manifest_text(bytes(source.read_file(MANIFEST_NAME)).decode(), where=where)
        except ShardNotFoundError:
            raise DatasetNotFoundError(f"{source.url} is not a cifar5m dataset: no {MANIFEST_NAME}") from None
        if split not in manifest.splits:
            raise SampleNotFoundError(f"{source.url} has no split {split!r}; it has {manifest.splits}")
        try:
            data = source.read_file(INDEX_NAME)
        except ShardNotFoundError:
            raise DatasetNotFoundError(f"{source.url}/{INDEX_NAME} is missing; the dataset is incomplete") from None
        where = f"{source.url}/{INDEX_NAME}"
        check_file(data, manifest.file_info(INDEX_NAME), where=where)  # labels come from it
        table = read_index(pa.BufferReader(pa.py_buffer(data)), columns=list(_COLUMNS), where=where)
        return cls.from_table(table, manifest, split, url=source.url)

    @classmethod
    def from_table(cls, table: pa.Table, manifest: Manifest, split: str, *, url: str) -> Catalog:
        infos = manifest.split_shards(split)
        table = table.filter(pc.equal(table["split"], split)).sort_by("position")
        names = [s.file for s in infos]
        try:
            runs = shard_runs(table["shard"])
        except ValueError as exc:
            raise ManifestError(f"{url}/{INDEX_NAME}: {exc}; re-create the dataset") from None
        if unknown := sorted(set(runs) - set(names)):
            raise ManifestError(f"{url}/{INDEX_NAME} lists shard {unknown[0]!r}, which the manifest's "
                                f"{split} split does not hold; re-create the dataset")
        empty = slice(0, 0)
        starts = np.array([runs.get(n, empty).start for n in names], np.int64)
        counts = np.array([runs.get(n, empty).stop - runs.get(n, empty).start for n in names], np.int64)
        shard_id = np.zeros(len(table), np.int32)
        for i, name in enumerate(names):
            shard_id[runs.get(name, empty)] = i
        return cls(
            url=url, split=split, image_format=manifest.image_format,
            class_names=tuple(manifest.class_names), shards=names,
            shard_bytes=np.array([s.bytes for s in infos], np.int64),
            shard_sha=[s.sha256 for s in infos],
            shard_start=starts, shard_count=counts,
            shard_id=shard_id,
            image_offset=table["image_offset"].to_numpy().astype(np.int64),
            image_size=table["image_size"].to_numpy().astype(np.int64),
            labels=table["label"].to_numpy().astype(np.int64),
            keys=np.asarray(table["key"].to_numpy(zero_copy_only=False).astype(str)).astype(np.bytes_),
            digests=checksum.column(table), group_digests=checksum.column(table, checksum.GROUP_COLUMN),
        )

    @cached_property
    def group_start(self) -> np.ndarray:
        """Per position: the first position of its group of checksum.GROUP rows of its shard."""
        start = self.shard_start[self.shard_id]
        return start + (np.arange(len(self.shard_id)) - start) // checksum.GROUP * checksum.GROUP

    @cached_property
    def shard_stop(self) -> np.ndarray:
        """One past the last split position of each shard."""
        return self.shard_start + self.shard_count

    def __len__(self) -> int:
        return len(self.labels)

    def key_list(self, positions: np.ndarray) -> list[str]:
        return [k.decode() for k in self.keys[positions].tolist()]

    def fingerprint(self) -> str:
        """Identifies the split's content (shard checksums): saved in stream states."""
        h = hashlib.sha256(self.split.encode())
        for name, sha in zip(self.shards, self.shard_sha, strict=True):
            h.update(f"{name}:{sha};".encode())
        return h.hexdigest()[:16]
