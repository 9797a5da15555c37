"""A split's index as flat numpy arrays: where every sample's bytes lie, its label and key.

The one catalog of the format: ``cifar5m.shards.reader.Split`` (evaluation sets, labeler
training, the report, grids) and the training stream both read a split through it,
and the manifest and index through a ``cifar5m.shards.source.Source`` (one byte transport).
Built from ``index.parquet`` batch by batch into arrays of the split's size (a row
lands at its ``position``: no sort, no copy of the whole table), so a 5M-sample split
costs its arrays (~300 MB) rather than the Arrow table, its filtered copy and 5M
Python strings. DataLoader workers inherit it (fork) or unpickle it (spawn). Keys are
fixed-width bytes (5M as ``str`` objects cost ~350 MB and copy-on-write touches them
all on fork), looked up by binary search (``position``), never through a dict.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cifar5m.core.errors import (
    ChecksumMismatchError,
    DatasetNotFoundError,
    ManifestError,
    ManifestVersionError,
    SampleNotFoundError,
    ShardNotFoundError,
)
from cifar5m.shards import checksum
from cifar5m.shards.format import INDEX_NAME, MANIFEST_NAME
from cifar5m.shards.index import arrow_numpy, fixed_width, index_batches, value_codes
from cifar5m.shards.manifest import FileInfo, Manifest, load_manifest, read_manifest_text
from cifar5m.shards.source import Source

_COLUMNS = ("split", "shard", "position", "key", "image_offset", "image_size", "label", checksum.COLUMN,
            checksum.GROUP_COLUMN)
BATCH_ROWS = 1 << 17  # index rows decoded at a time: bounds the Arrow memory of a build


def check_file(data: bytes | memoryview, info: FileInfo | None, *, where: str) -> None:
    """Raise ChecksumMismatchError unless ``data`` matches ``info`` (size and sha256)."""
    if info is not None and (len(data) != info.bytes or hashlib.sha256(data).hexdigest() != info.sha256):
        raise _damaged(len(data), info, where=where)


def _damaged(size: int, info: FileInfo, *, where: str) -> ChecksumMismatchError:
    return ChecksumMismatchError(
        f"{where} does not match the size and sha256 that {MANIFEST_NAME} records "
        f"({size} bytes, {info.bytes} expected): the file is damaged; re-download "
        f"the dataset or re-create it (`cifar5m verify` checks every file)")


def read_manifest(source: Source) -> Manifest:
    """The dataset's manifest, fetched whole through ``source``."""
    if source.local:
        return load_manifest(source.url)  # names an unfinished write
    try:
        text = bytes(source.read_file(MANIFEST_NAME))
    except ShardNotFoundError:
        raise DatasetNotFoundError(f"{source.url} is not a cifar5m dataset: no {MANIFEST_NAME}") from None
    return read_manifest_text(text, where=f"{source.url}/{MANIFEST_NAME}")


IndexData = bytes | bytearray | memoryview | BinaryIO


def read_index_data(source: Source, manifest: Manifest) -> IndexData:
    """``index.parquet`` checked against the manifest's size and sha256 (labels come from it).
    Remote: its bytes, fetched whole (one GET: any static HTTP server works, also one without
    Range, which pyarrow's random reads of a remote file need). Local: the open file, hashed
    in pieces and then read a column chunk at a time, so its bytes (57 MB at 5M samples)
    are never all in the process; the caller closes it."""
    where, info = f"{source.url}/{INDEX_NAME}", manifest.file_info(INDEX_NAME)
    try:
        if source.local:
            f = source.open_file(INDEX_NAME)
            size = os.fstat(f.fileno()).st_size
            if info is not None and (size != info.bytes or hashlib.file_digest(f, "sha256").hexdigest()
                                     != info.sha256):
                f.close()
                raise _damaged(size, info, where=where)
            f.seek(0)
            return f
        data = source.read_file(INDEX_NAME)
    except ShardNotFoundError:
        raise DatasetNotFoundError(f"{where} is missing; the dataset is incomplete") from None
    check_file(data, info, where=where)
    return data


def index_input(data: IndexData) -> BinaryIO | pa.NativeFile:
    """What pyarrow reads ``data`` from: the file itself, or a reader of the bytes (no copy)."""
    return data if hasattr(data, "read") else pa.BufferReader(pa.py_buffer(data))


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
    image_size: np.ndarray  # int32 (the index's type; sums with offsets are int64)
    labels: np.ndarray  # int64
    keys: np.ndarray  # fixed-width bytes
    digests: np.ndarray  # uint64 XXH3 of each image member
    # uint64 XXH3 of each group of checksum.GROUP rows of a shard, shard after shard (group_of);
    # the index repeats it on every row of the group, this keeps it once
    group_digests: np.ndarray

    @classmethod
    def load(cls, source: Source, split: str) -> Catalog:
        """Read manifest and index through ``source`` (each fetched whole) and build ``split``."""
        return cls.load_splits(source, split)[0]

    @classmethod
    def load_splits(cls, source: Source, *splits: str) -> list[Catalog]:
        """``load`` of several splits with one read (and check) of manifest and index."""
        manifest = read_manifest(source)
        for split in splits:
            if split not in manifest.splits:
                raise SampleNotFoundError(f"{source.url} has no split {split!r}; it has {manifest.splits}")
        data = read_index_data(source, manifest)
        try:
            return [cls.from_index(data, manifest, split, url=source.url) for split in splits]
        finally:
            if hasattr(data, "close"):
                data.close()

    @classmethod
    def from_index(cls, data: IndexData, manifest: Manifest, split: str, *, url: str) -> Catalog:
        """``split`` of the (checked) bytes of ``index.parquet``, read batch by batch."""
        where = f"{url}/{INDEX_NAME}"
        return cls._build(lambda columns: index_batches(index_input(data), where=where, columns=columns,
                                                        batch_rows=BATCH_ROWS), manifest, split, url=url)

    @classmethod
    def from_table(cls, table: pa.Table, manifest: Manifest, split: str, *, url: str) -> Catalog:
        """``split`` of an index table already in memory."""
        table = table.select([c for c in _COLUMNS if c in table.column_names])  # before the filter's copy
        table = table.filter(pc.equal(table["split"], split))
        return cls._build(lambda columns: table.select([c for c in columns if c in table.column_names])
                          .to_batches(), manifest, split, url=url)

    @classmethod
    def _build(cls, read: Callable[[tuple[str, ...]], Iterable[pa.RecordBatch]], manifest: Manifest,
               split: str, *, url: str) -> Catalog:
        """Two passes over the index (``read(columns)``): the split's size and each shard's
        rows, then each batch's rows of ``split`` scattered to their positions."""
        where = f"{url}/{INDEX_NAME}"
        infos = manifest.split_shards(split)
        names = [s.file for s in infos]
        n, first, count = _layout(read(("split", "shard", "position")), split, names)
        base = _group_bases(count)
        arrays = {"shard_id": np.zeros(n, np.int32), "image_offset": np.zeros(n, np.int64),
                  "image_size": np.zeros(n, np.int32), "labels": np.zeros(n, np.int64),
                  "digests": np.zeros(n, np.uint64), "group_digests": np.zeros(int(base[-1]), np.uint64)}
        keys, seen = np.zeros(n, "S1"), np.zeros(n, bool)
        complete = {"digests": True, "group_digests": True}  # False: absent, or with nulls
        for batch in read(_COLUMNS):
            rows = _split_rows(batch, split, names, where=where)
            pos = rows.pop("position")
            if len(pos) and (pos.min() < 0 or pos.max() >= n):
                raise _bad_positions(where, split, n)
            seen[pos] = True
            at = _run_or(pos)
            sid = rows["shard_id"]
            groups = base[sid] + np.clip(pos - first[sid], 0, count[sid] - 1) // checksum.GROUP
            for name, values in rows.items():
                if name == "keys":
                    if values.dtype.itemsize > keys.dtype.itemsize:
                        keys = keys.astype(values.dtype)
                    keys[at] = values
                elif values is None:
                    complete[name] = False
                elif complete.get(name, True):
                    arrays[name][groups if name == "group_digests" else at] = values
        if not seen.all():  # n rows, so a position given twice leaves another out
            raise _bad_positions(where, split, n)
        # Each shard's positions must be one run [first, first + count), in order of first.
        order = np.flatnonzero(count)[np.argsort(first[count > 0], kind="stable")]
        if not np.array_equal(arrays["shard_id"], np.repeat(order, count[order])):
            raise ManifestError(f"{where}: index rows are not grouped by shard; re-create the dataset")
        pa.default_memory_pool().release_unused()  # the batches' buffers, kept by the allocator
        if not all(complete.values()):
            if manifest.version >= 2:
                raise ManifestError(f"{where} lacks the checksum columns format version 2 requires; "
                                    f"re-create or re-download the dataset")
            raise ManifestVersionError(  # written before format version 2 added them
                f"{where} has no per-member checksums (format version 1); run "
                f"`cifar5m upgrade {url}` once to add them")
        return cls(
            url=url, split=split, image_format=manifest.image_format,
            class_names=tuple(manifest.class_names), shards=names,
            shard_bytes=np.array([s.bytes for s in infos], np.int64), shard_sha=[s.sha256 for s in infos],
            shard_start=first, shard_count=count, shard_id=arrays["shard_id"],
            image_offset=arrays["image_offset"], image_size=arrays["image_size"], labels=arrays["labels"],
            keys=keys, digests=arrays["digests"], group_digests=arrays["group_digests"])

    @cached_property
    def group_base(self) -> np.ndarray:
        """Index in ``group_digests`` of each shard's first group."""
        return _group_bases(self.shard_count)[:-1]

    def group_first(self, rows: np.ndarray) -> np.ndarray:
        """The first position of each row's group of checksum.GROUP rows of its shard."""
        start = self.shard_start[self.shard_id[rows]]
        return start + (rows - start) // checksum.GROUP * checksum.GROUP

    def group_of(self, rows: np.ndarray) -> np.ndarray:
        """Index in ``group_digests`` of each row's group."""
        shard = self.shard_id[rows]
        return self.group_base[shard] + (rows - self.shard_start[shard]) // checksum.GROUP

    @cached_property
    def shard_stop(self) -> np.ndarray:
        """One past the last split position of each shard."""
        return self.shard_start + self.shard_count

    def __len__(self) -> int:
        return len(self.labels)

    def key_list(self, positions: np.ndarray) -> list[str]:
        return [k.decode() for k in self.keys[positions].tolist()]

    @cached_property
    def _key_order(self) -> np.ndarray | None:
        """Positions in key order, for the binary search (None: keys are in order already, as
        the writer and importer number them)."""
        keys = self.keys
        if len(keys) < 2 or bool((keys[1:] >= keys[:-1]).all()):
            return None
        return np.argsort(keys, kind="stable")

    def position(self, key: str) -> int | None:
        """The split position of ``key`` (None: no such key): a binary search of the keys."""
        want = key.encode()
        if not want or len(want) > self.keys.dtype.itemsize or want.endswith(b"\0"):
            return None
        order = self._key_order
        i = int(np.searchsorted(self.keys, np.bytes_(want), sorter=order))
        if i == len(self.keys):
            return None
        found = i if order is None else int(order[i])
        return found if self.keys[found] == want else None

    def fingerprint(self) -> str:
        """Identifies the split's content (shard checksums): saved in stream states."""
        h = hashlib.sha256(self.split.encode())
        for name, sha in zip(self.shards, self.shard_sha, strict=True):
            h.update(f"{name}:{sha};".encode())
        return h.hexdigest()[:16]


def _split_rows(batch: pa.RecordBatch, split: str, shards: list[str], *, where: str) -> dict:
    """The catalog's columns of ``batch``'s rows of ``split`` as numpy arrays (a digest
    column absent or with nulls: None), ``shard_id`` numbered as in ``shards``."""
    mask = value_codes(batch["split"], [split]) == 0
    every = bool(mask.all())

    def rows(values: np.ndarray) -> np.ndarray:
        return values if every else values[mask]

    shard = value_codes(batch["shard"], shards)
    if (shard[mask] < 0).any():
        bad = batch["shard"][int(np.flatnonzero(mask & (shard < 0))[0])].as_py()
        raise ManifestError(f"{where} lists shard {bad!r}, which the manifest's {split} "
                            f"split does not hold; re-create the dataset")
    out = {"position": rows(arrow_numpy(batch["position"])).astype(np.int64), "shard_id": rows(shard),
           "keys": rows(fixed_width(batch["key"]))}
    for name, column in (("image_offset", "image_offset"), ("image_size", "image_size"), ("labels", "label"),
                         ("digests", checksum.COLUMN), ("group_digests", checksum.GROUP_COLUMN)):
        missing = column not in batch.schema.names or batch[column].null_count
        out[name] = None if missing else rows(arrow_numpy(batch[column]))
    return out


def _layout(batches: Iterable[pa.RecordBatch], split: str,
            shards: list[str]) -> tuple[int, np.ndarray, np.ndarray]:
    """``(samples of split, first position of each shard, its samples)`` from the ``split``,
    ``shard`` and ``position`` columns (rows of unknown shards are reported by the build)."""
    n, first, count = 0, np.full(len(shards), np.iinfo(np.int64).max), np.zeros(len(shards), np.int64)
    for batch in batches:
        mask = value_codes(batch["split"], [split]) == 0
        sid, pos = value_codes(batch["shard"], shards)[mask], arrow_numpy(batch["position"])[mask]
        known = sid >= 0
        np.minimum.at(first, sid[known], pos[known])
        count += np.bincount(sid[known], minlength=len(shards))
        n += int(mask.sum())
    return n, np.where(count > 0, first, 0), count


def _bad_positions(where: str, split: str, n: int) -> ManifestError:
    return ManifestError(f"{where}: the positions of split {split!r} are not 0..{n - 1}, each once; "
                         f"re-create the dataset")


def _run_or(positions: np.ndarray) -> slice | np.ndarray:
    """``positions`` as a slice where they are consecutive (as written: one copy instead of a
    scatter), else themselves."""
    if len(positions) and positions[-1] - positions[0] == len(positions) - 1 \
            and bool((np.diff(positions) == 1).all()):
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


def _group_bases(count: np.ndarray) -> np.ndarray:
    """Index in ``group_digests`` of each shard's first group, and the total at the end."""
    return np.r_[0, np.cumsum(-(-count // checksum.GROUP))].astype(np.int64)
