"""Reading datasets: iterate a split, or read any sample by key or position.

Works on a local directory and on any http(s) or fsspec URL (``s3://``, ...) through the
same byte source (``cifar5m.shards.source``) and catalog (``cifar5m.shards.catalog``) as the training
stream: single samples cost one byte-range request through the index, and a server's
reason for refusing (an ``X-Error-Message``) reaches the error. Every error names the
shard and, where it applies, the offset.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from cifar5m.core.errors import CorruptShardError, SampleNotFoundError
from cifar5m.shards import checksum, codec
from cifar5m.shards.catalog import Catalog, IndexData, index_input, read_index_data, read_manifest
from cifar5m.shards.format import INDEX_NAME
from cifar5m.shards.index import read_index
from cifar5m.shards.manifest import Manifest, ShardInfo
from cifar5m.shards.shard import Sample
from cifar5m.shards.source import Source, open_source

__all__ = ["Batch", "Dataset", "Sample", "Split"]


class Batch(NamedTuple):
    keys: list[str]
    images: np.ndarray  # (N, 32, 32, 3) uint8
    labels: np.ndarray  # (N,) int64


class Dataset:
    """A dataset directory, local or remote (http(s) or any fsspec URL), read through one
    ``cifar5m.shards.source.Source`` and one ``cifar5m.shards.catalog.Catalog`` per split, as the training
    stream reads it."""

    def __init__(self, root: str | os.PathLike, *, storage_options: dict | None = None) -> None:
        self.url = str(root)
        self.source: Source = open_source(self.url, storage_options=storage_options)
        self.is_local = self.source.local
        self.manifest: Manifest = read_manifest(self.source)
        self.shards: dict[str, ShardInfo] = {s.file: s for s in self.manifest.shards}

    def location(self, name: str) -> str:
        """Path or URL of a file of the dataset."""
        return str(Path(self.source.url) / name) if self.is_local else f"{self.source.url}/{name}"

    @cached_property
    def _remote_index(self) -> IndexData:
        return read_index_data(self.source, self.manifest)  # one GET for every split

    @contextlib.contextmanager
    def _index_data(self) -> Iterator[IndexData]:
        """The checked index: a local one opened (and checked) for each read, never held."""
        if not self.is_local:
            yield self._remote_index
            return
        with read_index_data(self.source, self.manifest) as f:
            yield f

    @cached_property
    def index(self) -> pa.Table:
        """The whole index (every column), read in one piece and checked against the
        manifest's size and sha256 before it is parsed."""
        with self._index_data() as data:
            return read_index(index_input(data), where=self.location(INDEX_NAME))

    def split(self, name: str) -> Split:
        if name not in self.manifest.splits:
            raise SampleNotFoundError(f"{self.url} has no split {name!r}; it has {self.manifest.splits}")
        return Split(self, name)

    def read_bytes(self, file: str, start: int | None = None, end: int | None = None) -> bytes | memoryview:
        """Bytes ``[start, end)`` of a dataset file (both or neither: the whole file; short
        where the file ends early)."""
        if start is None:
            return self.source.read_whole(file)
        assert end is not None, "read_bytes: a start needs an end"
        return self.source.fetch([(file, start, end)])[0]

    def read_shard(self, file: str) -> bytes | memoryview:
        """A whole shard, checked for truncation against the manifest's size (its members are
        checked against their digests by the caller)."""
        data = self.read_bytes(file)
        expected = self.shards[file].bytes
        if len(data) != expected:
            raise CorruptShardError(
                f"{self.location(file)} is truncated or altered: {len(data)} bytes, the manifest "
                f"says {expected}; re-download it or run `cifar5m verify`"
            )
        return data


class Keys(Sequence):
    """A split's keys as ``str``, read from the catalog's fixed-width bytes on demand (no
    list of millions of Python strings)."""

    def __init__(self, keys: np.ndarray) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            return self._keys[i].decode()
        return [k.decode() for k in self._keys[i].tolist()]

    def __eq__(self, other: object) -> bool:  # equal to a list of the same keys
        if isinstance(other, Keys):
            return np.array_equal(self._keys, other._keys)
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


class ShardNames:
    """``shard_of[position]``: the file of the shard holding that sample."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def __getitem__(self, i: int) -> str:
        return self._catalog.shards[int(self._catalog.shard_id[i])]


class Split:
    """The samples of one split, in order, with random access through the catalog."""

    def __init__(self, dataset: Dataset, name: str) -> None:
        self.dataset = dataset
        self.name = name
        if "index" in dataset.__dict__:  # the whole table already read: no second read and hash
            cat = Catalog.from_table(dataset.index, dataset.manifest, name, url=dataset.source.url)
        else:
            with dataset._index_data() as data:
                cat = Catalog.from_index(data, dataset.manifest, name, url=dataset.source.url)
        self.catalog = cat
        self.keys = Keys(cat.keys)
        self.shard_of = ShardNames(cat)
        self.image_offset, self.image_size = cat.image_offset, cat.image_size
        self.digests = cat.digests  # per member, checked on every read
        self.labels = cat.labels
        self.format = cat.image_format
        self.shard_files = cat.shards
        self._shard_number = {file: i for i, file in enumerate(cat.shards)}

    def __len__(self) -> int:
        return len(self.keys)

    def position(self, key: str) -> int:
        """The position of ``key`` (a binary search of the catalog's keys, no dict)."""
        found = self.catalog.position(key)
        if found is None:
            raise SampleNotFoundError(f"no sample with key {key!r} in split {self.name!r}")
        return found

    def __getitem__(self, position: int) -> Sample:
        if not -len(self) <= position < len(self):
            raise SampleNotFoundError(f"position {position} is outside split {self.name!r} of {len(self)}")
        i = position % len(self)
        start = int(self.image_offset[i])
        data = self.dataset.read_bytes(self.shard_of[i], start, start + int(self.image_size[i]))
        if checksum.digest(data) != int(self.digests[i]):
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
        i = self._shard_number.get(shard)
        if i is None:
            return slice(0, 0)
        start = int(self.catalog.shard_start[i])
        return slice(start, start + int(self.catalog.shard_count[i]))

    def decode_shard(self, shard: str) -> Batch:
        """Every sample of one shard, decoded (npy shards in one vectorised gather)."""
        rows = self.rows(shard)
        data = self.dataset.read_shard(shard)
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
