"""Reading datasets: iterate a split, or read any sample by key or position.

Works on a local directory (files read directly) and on any fsspec URL
(``http://``, ``s3://``, ...), where single samples cost one byte-range request
through the index. Every error names the shard and, where it applies, the offset.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from cifar5m.errors import (
    ChecksumMismatchError,
    CorruptShardError,
    DatasetNotFoundError,
    SampleNotFoundError,
    ShardNotFoundError,
)
from shards import checksum, codec
from shards.format import INDEX_NAME, MANIFEST_NAME
from shards.index import read_index, shard_runs
from shards.manifest import FileInfo, Manifest, ShardInfo, load_manifest, read_manifest_text


class Sample(NamedTuple):
    key: str
    image: np.ndarray  # (32, 32, 3) uint8
    label: int


class Batch(NamedTuple):
    keys: list[str]
    images: np.ndarray  # (N, 32, 32, 3) uint8
    labels: np.ndarray  # (N,) int64


class Dataset:
    """A dataset directory, local or remote (any fsspec URL)."""

    def __init__(self, root: str | os.PathLike, *, storage_options: dict | None = None) -> None:
        self.url = str(root)
        self.fs, self.path = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.manifest: Manifest = self._load_manifest()
        self.shards: dict[str, ShardInfo] = {s.file: s for s in self.manifest.shards}

    def _load_manifest(self) -> Manifest:
        if self.is_local:
            return load_manifest(self.path)
        where = self.location(MANIFEST_NAME)
        try:
            text = self.fs.cat_file(where).decode()
        except FileNotFoundError:
            raise DatasetNotFoundError(f"{self.url} is not a cifar5m dataset: no {MANIFEST_NAME}") from None
        return read_manifest_text(text, where=where)

    def location(self, name: str) -> str:
        """Path or URL of a file of the dataset."""
        return str(Path(self.path) / name) if self.is_local else f"{self.path.rstrip('/')}/{name}"

    @cached_property
    def index(self) -> pa.Table:
        """The whole index, read in one piece (one GET remotely: pyarrow would issue range
        requests, which plain static servers do not support) and checked against the
        manifest's size and sha256 before it is parsed."""
        where = self.location(INDEX_NAME)
        try:
            data = self.read_bytes(INDEX_NAME)
        except ShardNotFoundError:
            raise DatasetNotFoundError(f"{where} is missing; the dataset is incomplete") from None
        check_file(data, self.manifest.file_info(INDEX_NAME), where=where)
        return read_index(pa.BufferReader(data), where=where)

    def split(self, name: str) -> Split:
        if name not in self.manifest.splits:
            raise SampleNotFoundError(f"{self.url} has no split {name!r}; it has {self.manifest.splits}")
        return Split(self, name)

    def read_bytes(self, file: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of a dataset file (the whole file by default)."""
        where = self.location(file)
        try:
            if self.is_local:
                with open(where, "rb") as f:
                    if start is None:
                        return f.read()
                    if end is None:
                        end = os.fstat(f.fileno()).st_size
                    return os.pread(f.fileno(), end - start, start)
            return self.fs.cat_file(where, start=start, end=end)
        except FileNotFoundError:
            raise ShardNotFoundError(
                f"{where} is missing; the manifest lists it (re-download or re-create the dataset)"
            ) from None

    def read_shard(self, file: str, *, sha256: bool = False) -> bytes:
        """A whole shard, checked for truncation against the manifest's size (and its
        sha256 with ``sha256``: datasets without per-member digests)."""
        data = self.read_bytes(file)
        expected = self.shards[file].bytes
        if len(data) != expected:
            raise CorruptShardError(
                f"{self.location(file)} is truncated or altered: {len(data)} bytes, the manifest "
                f"says {expected}; re-download it or run `cifar5m verify`"
            )
        if sha256 and hashlib.sha256(data).hexdigest() != self.shards[file].sha256:
            raise CorruptShardError(
                f"{self.location(file)} does not match its sha256 in the manifest (corrupted); "
                f"run `cifar5m verify`, then re-download or re-create it")
        return data


def check_file(data: bytes | memoryview, info: FileInfo | None, *, where: str) -> None:
    """Raise ChecksumMismatchError unless ``data`` matches ``info`` (size and sha256)."""
    if info is None:
        return
    if len(data) != info.bytes or hashlib.sha256(data).hexdigest() != info.sha256:
        raise ChecksumMismatchError(
            f"{where} does not match the size and sha256 that {MANIFEST_NAME} records "
            f"({len(data)} bytes, {info.bytes} expected): the file is damaged; re-download "
            f"the dataset or re-create it (`cifar5m verify` checks every file)")


class Split:
    """The samples of one split, in order, with random access through the index."""

    def __init__(self, dataset: Dataset, name: str) -> None:
        self.dataset = dataset
        self.name = name
        table = dataset.index.filter(pc.equal(dataset.index["split"], name)).sort_by("position")
        self.keys: list[str] = table["key"].to_pylist()
        self._slices = shard_runs(table["shard"])
        self.shard_of = np.empty(len(self.keys), dtype=object)
        for shard, rows in self._slices.items():
            self.shard_of[rows] = shard
        self.image_offset = table["image_offset"].to_numpy()
        self.image_size = table["image_size"].to_numpy()
        # Per-member digests (None: an index written before them; whole shards are then
        # checked by their sha256 instead).
        self.digests = checksum.column(table)
        self.labels = table["label"].to_numpy().astype(np.int64)
        self.format = dataset.manifest.image_format
        self.shard_files = [s.file for s in dataset.manifest.split_shards(name)]

    def __len__(self) -> int:
        return len(self.keys)

    @cached_property
    def _position_of(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    def position(self, key: str) -> int:
        try:
            return self._position_of[key]
        except KeyError:
            raise SampleNotFoundError(f"no sample with key {key!r} in split {self.name!r}") from None

    def __getitem__(self, position: int) -> Sample:
        if not -len(self) <= position < len(self):
            raise SampleNotFoundError(f"position {position} is outside split {self.name!r} of {len(self)}")
        i = position % len(self)
        start = int(self.image_offset[i])
        data = self.dataset.read_bytes(self.shard_of[i], start, start + int(self.image_size[i]))
        if self.digests is not None and checksum.digest(data) != int(self.digests[i]):
            raise checksum.mismatch(self.dataset.location(self.shard_of[i]), self.keys[i], start)
        return Sample(self.keys[i], self._decode(data, self.shard_of[i], start), int(self.labels[i]))

    def get(self, key: str) -> Sample:
        return self[self.position(key)]

    def _decode(self, data: bytes, shard: str, offset: int) -> np.ndarray:
        try:
            return codec.decode_image(data, self.format)
        except ValueError as exc:
            raise CorruptShardError(f"{self.dataset.location(shard)} at byte {offset}: {exc}; run "
                                    f"`cifar5m verify`, then re-download or re-create it") from None

    def rows(self, shard: str) -> slice:
        """Split positions of ``shard``'s samples (empty for a shard of another split)."""
        return self._slices.get(shard, slice(0, 0))

    def decode_shard(self, shard: str) -> Batch:
        """Every sample of one shard, decoded (npy shards in one vectorised gather)."""
        rows = self.rows(shard)
        data = self.dataset.read_shard(shard, sha256=self.digests is None)
        if self.digests is not None:
            bad = checksum.first_bad_at(data, self.image_offset[rows], self.image_size[rows],
                                        self.digests[rows])
            if bad >= 0:
                raise checksum.mismatch(self.dataset.location(shard), self.keys[rows.start + bad],
                                        int(self.image_offset[rows.start + bad]))
        buffer = np.frombuffer(data, np.uint8)
        if self.format == "npy":
            try:
                images = codec.decode_npy_batch(buffer, self.image_offset[rows])
            except ValueError as exc:
                raise CorruptShardError(f"{self.dataset.location(shard)}: {exc}") from None
        else:
            images = np.empty((rows.stop - rows.start, 32, 32, 3), np.uint8)
            view = memoryview(data)
            for j, (off, size) in enumerate(zip(self.image_offset[rows].tolist(),
                                                self.image_size[rows].tolist(), strict=True)):
                images[j] = self._decode(view[off : off + size], shard, off)
        return Batch(self.keys[rows], images, self.labels[rows])

    def iter_batches(self, batch_size: int) -> Iterator[Batch]:
        """Consecutive batches of the split in order (the last one may be short)."""
        rest: Batch | None = None
        for shard in self.shard_files:
            batch = self.decode_shard(shard)
            if rest is not None:  # only a batch that straddles two shards is copied
                batch = _concat([rest, batch])
            stop = len(batch.keys) - len(batch.keys) % batch_size
            for a in range(0, stop, batch_size):
                yield Batch(batch.keys[a : a + batch_size], batch.images[a : a + batch_size],
                            batch.labels[a : a + batch_size])
            rest = Batch(batch.keys[stop:], batch.images[stop:], batch.labels[stop:]) if stop < len(batch.keys) else None
        if rest is not None:
            yield rest

    def load(self, *, limit: int | None = None) -> Batch:
        """The split's first ``limit`` samples (all when None) in memory, decoded: keys, uint8
        ``(N, 32, 32, 3)`` images and int64 labels. Reads only the shards it needs."""
        batches, have = [], 0
        for shard in self.shard_files:
            if limit is not None and have >= limit:
                break
            batches.append(self.decode_shard(shard))
            have += len(batches[-1].keys)
        if not batches:
            return Batch([], np.empty((0, 32, 32, 3), np.uint8), np.empty(0, np.int64))
        whole = _concat(batches)
        return Batch(whole.keys[:limit], whole.images[:limit], whole.labels[:limit])

    def __iter__(self) -> Iterator[Sample]:
        for shard in self.shard_files:
            batch = self.decode_shard(shard)
            for key, image, label in zip(batch.keys, batch.images, batch.labels.tolist(), strict=True):
                yield Sample(key, image, label)


def _concat(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    return Batch(
        [k for b in batches for k in b.keys],
        np.concatenate([b.images for b in batches]),
        np.concatenate([b.labels for b in batches]),
    )
