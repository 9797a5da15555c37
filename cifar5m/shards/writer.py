"""Writing datasets: shards, their index parts, then index, card and manifest.

Write order is what makes a crash harmless:

1. each shard is built in memory (~40 MB at 10k PNG samples), written to a temp
   name and renamed to ``{split}-{index:06d}.tar``;
2. then its index rows go to ``_work/{split}-{index:06d}.parquet`` (temp + rename),
   carrying the shard's size and sha256: a shard without its part is unfinished;
3. ``finalize`` streams all parts into ``index.parquet``, writes ``README.md`` and
   finally ``manifest.json``, then removes ``_work/``.

``cifar5m.shards.shard.write_shard`` is usable on its own, so several processes (torchrun
ranks) can write disjoint shards of one dataset and one of them finalises.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cifar5m.core.atomic import atomic_write_bytes, disk_full
from cifar5m.core.errors import ConfigMismatchError, DatasetExistsError
from cifar5m.shards import checksum
from cifar5m.shards.card import render_card
from cifar5m.shards.format import (
    CARD_NAME,
    CIFAR10_CLASSES,
    DEFAULT_SHARD_SIZE,
    FORMAT_VERSION,
    IMAGE_FORMATS,
    INDEX_NAME,
    MANIFEST_NAME,
    SPLITS,
    WORK_DIR,
)
from cifar5m.shards.index import SCHEMA, read_index, shard_runs
from cifar5m.shards.lock import DirectoryLock
from cifar5m.shards.manifest import Manifest, load_manifest, write_manifest

# Re-exported: callers write `from cifar5m.shards.writer import Sample, write_shard, ...`.
from cifar5m.shards.shard import (
    Sample,
    ShardRecord,
    encode_shard,
    file_info,
    load_records,
    part_path,
    sha256_file,
    write_part,
    write_shard,
)

__all__ = [
    "DatasetWriter",
    "Sample",
    "ShardRecord",
    "begin",
    "check_fingerprint",
    "encode_shard",
    "finalize",
    "load_records",
    "part_path",
    "records_from_dataset",
    "sha256_file",
    "write_part",
    "write_shard",
]

STATE_NAME = "state.json"


def records_from_dataset(root: str | Path) -> dict[str, ShardRecord]:
    """The shards of a finished dataset as records (to extend it)."""
    manifest = load_manifest(root)
    index = read_index(Path(root) / INDEX_NAME)
    out = {}
    runs = shard_runs(index["shard"])
    for info in manifest.shards:
        rows = runs[info.file]
        out[info.file] = ShardRecord(info, index.slice(rows.start, rows.stop - rows.start))
    return out


def _ordered(records: Iterable[ShardRecord]) -> list[ShardRecord]:
    rank = {s: i for i, s in enumerate(SPLITS)}
    return sorted(records, key=lambda r: (rank.get(r.info.split, len(rank)), r.info.split, r.info.file))


def _with_digests(root: Path, rec: ShardRecord, table: pa.Table) -> pa.Table:
    """Rows of a shard written before the digest columns existed (an old dataset being
    extended, an old unfinished write resumed) get them from the shard's bytes, which
    ``begin`` checked against their sha256."""
    names = (checksum.COLUMN, checksum.GROUP_COLUMN)
    if all(n in table.column_names and table[n].null_count == 0 for n in names):
        return table
    with open(root / rec.info.file, "rb") as f:
        data = f.read()
    offsets, sizes = table["image_offset"].to_pylist(), table["image_size"].to_pylist()
    values = {checksum.COLUMN: checksum.digests(data, offsets, sizes),
              checksum.GROUP_COLUMN: checksum.group_digests(data, offsets, sizes)}
    for name in names:
        column = pa.array(values[name], pa.uint64())
        if name in table.column_names:
            table = table.set_column(table.schema.get_field_index(name), name, column)
        else:
            table = table.append_column(name, column)
    return table


def _write_index(root: Path, tmp_index: Path, ordered: list[ShardRecord]) -> None:
    with pq.ParquetWriter(tmp_index, SCHEMA, compression="zstd", use_dictionary=["split", "shard"]) as out:
        counts: dict[str, int] = {}
        for rec in ordered:
            start = counts.get(rec.info.split, 0)
            positions = pa.array(np.arange(start, start + rec.info.samples, dtype=np.int64))
            table = _with_digests(root, rec, rec.rows()).select(SCHEMA.names).cast(SCHEMA)
            table = table.set_column(SCHEMA.get_field_index("position"), SCHEMA.field("position"), positions)
            out.write_table(table)
            counts[rec.info.split] = start + rec.info.samples
    with open(tmp_index, "rb+") as f:  # durable before it replaces the old index
        os.fsync(f.fileno())


def finalize(
    root: str | Path,
    records: Iterable[ShardRecord],
    *,
    image_format: str,
    class_names: Sequence[str] = CIFAR10_CLASSES,
    provenance: dict[str, Any] | None = None,
) -> Manifest:
    """Write index, card and (last) manifest for ``records``; remove the work dir."""
    root = Path(root)
    ordered = _ordered(records)
    tmp_index = root / f".{INDEX_NAME}.tmp"
    try:
        _write_index(root, tmp_index, ordered)
    except OSError as exc:
        tmp_index.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC or "No space left" in str(exc):
            raise disk_full(root / INDEX_NAME, 40 * sum(r.info.samples for r in ordered)) from None
        raise
    tmp_index.replace(root / INDEX_NAME)
    shards = tuple(r.info for r in ordered)
    manifest = with_files(root, Manifest(image_format=image_format, class_names=tuple(class_names),
                                         shards=shards), provenance or {})
    write_manifest(root, manifest)
    shutil.rmtree(root / WORK_DIR, ignore_errors=True)
    return manifest


def with_files(root: Path, manifest: Manifest, provenance: dict[str, Any]) -> Manifest:
    """``manifest`` with ``provenance``, its card (re)written and fresh index/card checksums
    (other listed files kept, in their order); used by ``finalize`` and by a relabel."""
    draft = dataclasses.replace(manifest, provenance=provenance, version=FORMAT_VERSION)
    atomic_write_bytes(root / CARD_NAME, render_card(draft).encode())
    fresh = {INDEX_NAME: file_info(root, INDEX_NAME), CARD_NAME: file_info(root, CARD_NAME)}
    files = tuple(fresh.pop(f.file, f) for f in manifest.files) + tuple(fresh.values())
    return dataclasses.replace(draft, files=files)


def check_fingerprint(where: str, previous: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Refuse to resume or extend ``where`` (written with ``previous``) with other settings."""
    if previous == fingerprint:
        return
    changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
    raise ConfigMismatchError(
        f"{where} holds a dataset made with other settings ({', '.join(changed)} differ: "
        f"{ {k: previous.get(k) for k in changed} } there); use the same settings to resume "
        f"or extend it, or another output directory"
    )


def begin(root: str | Path, fingerprint: dict[str, Any], *, extend: bool = False,
          on_damaged: Callable[[Path, str], None] | None = None) -> dict[str, ShardRecord]:
    """Open ``root`` for writing; return the shards already finished there.

    A fresh directory starts empty. An unfinished write with the same ``fingerprint``
    resumes (its shards are checked and kept; a missing or damaged one raises, or with
    ``on_damaged`` is dropped to be rewritten, see ``load_records``). A different
    fingerprint, or a finished dataset without ``extend``, is refused before anything
    is written.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / WORK_DIR / STATE_NAME
    finished = (root / MANIFEST_NAME).is_file()
    if finished and not extend and not state_path.is_file():
        raise DatasetExistsError(
            f"{root} already holds a finished dataset; choose another output directory "
            f"or delete it first"
        )
    if state_path.is_file():
        previous = json.loads(state_path.read_text())["fingerprint"]
    elif finished:
        previous = load_manifest(root).provenance.get("fingerprint", fingerprint)
    else:
        previous = fingerprint
    check_fingerprint(str(root), previous, fingerprint)
    for stale in root.glob(".*.tmp"):
        stale.unlink()
    (root / WORK_DIR).mkdir(exist_ok=True)
    atomic_write_bytes(state_path, json.dumps({"fingerprint": fingerprint}, indent=1).encode())
    records = load_records(root, on_damaged=on_damaged)
    if finished:
        # Extending: first give every finished shard its part in _work/, then take the
        # manifest away. While shards change, readers then see an unfinished write (a
        # DatasetNotFoundError that says so) rather than a manifest that no longer
        # matches the bytes; a crash anywhere in between resumes the same way.
        for file, rec in records_from_dataset(root).items():
            if file not in records:
                records[file] = ShardRecord(rec.info, None, write_part(root, rec.info, rec.rows()))
        (root / MANIFEST_NAME).unlink()
    return records


class DatasetWriter:
    """Stream samples into a dataset with bounded memory; resumable.

    >>> with DatasetWriter("out", fingerprint={"source": "x"}) as w:   # doctest: +SKIP
    ...     skip = w.completed("train")        # samples already durable from a killed run
    ...     for sample in samples[skip:]:
    ...         w.add("train", sample)

    Shards roll over every ``shard_size`` samples per split. On a clean exit the
    index, card and manifest are written; on an exception they are not, and running
    the same code again resumes after the last finished shard.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        fingerprint: dict[str, Any],
        image_format: str = "png",
        shard_size: int = DEFAULT_SHARD_SIZE,
        class_names: Sequence[str] = CIFAR10_CLASSES,
        provenance: dict[str, Any] | None = None,
        extend: bool = False,
        workers: int = 0,
    ) -> None:
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"unknown image format {image_format!r}; use one of {IMAGE_FORMATS}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        self.root = Path(root)
        self.image_format = image_format
        self.shard_size = shard_size
        self.class_names = tuple(class_names)
        self.fingerprint = {**fingerprint, "image_format": image_format, "shard_size": shard_size}
        self.provenance = {**(provenance or {}), "fingerprint": self.fingerprint}
        self._new_work = not (self.root / WORK_DIR).exists()
        # One writer per directory: a second one is refused here, before it touches anything.
        self._lock = DirectoryLock(self.root).acquire()
        try:
            self.records = begin(self.root, self.fingerprint, extend=extend)
        except BaseException:
            self._abandon()
            raise
        self._next_index = self._keep_prefix()
        self._pending: dict[str, list[Sample]] = {}
        # PNG encoding is ~4k images/s per core: shards are encoded in worker processes
        # when asked, at most 2 per worker in flight so memory stays bounded.
        self._pool = None
        if workers > 0:
            from cifar5m.shards.worker_pool import process_pool

            self._pool = process_pool(workers)  # its workers die with this process
        self._workers = workers
        self._futures: deque = deque()
        self.manifest: Manifest | None = None

    def _keep_prefix(self) -> dict[str, int]:
        """Keep each split's finished shards 0..k-1; drop later ones left by parallel workers.

        Resuming then means skipping exactly ``completed(split)`` samples in order.
        """
        next_index: dict[str, int] = {}
        for rec in sorted(self.records.values(), key=lambda r: r.info.file):
            split = rec.info.split
            idx = int(Path(rec.info.file).stem.rsplit("-", 1)[1])
            if idx == next_index.get(split, 0):
                next_index[split] = idx + 1
            else:
                del self.records[rec.info.file]
                part_path(self.root, rec.info.file).unlink(missing_ok=True)
                (self.root / rec.info.file).unlink(missing_ok=True)
        return next_index

    def completed(self, split: str) -> int:
        """Samples of ``split`` already in finished shards (skip these when resuming)."""
        return sum(r.info.samples for r in self.records.values() if r.info.split == split)

    def add(self, split: str, sample: Sample) -> None:
        pending = self._pending.setdefault(split, [])
        pending.append(sample)
        if len(pending) >= self.shard_size:
            self._flush(split)

    def _flush(self, split: str) -> None:
        pending = self._pending.pop(split, [])
        if not pending:
            return
        index = self._next_index.get(split, 0)
        self._next_index[split] = index + 1
        if self._pool is None:
            rec = write_shard(self.root, split, index, pending, image_format=self.image_format)
            self.records[rec.info.file] = rec.slim()
            return
        self._futures.append(self._pool.submit(
            write_shard, self.root, split, index, pending, image_format=self.image_format))
        while len(self._futures) > 2 * self._workers:
            self._collect()

    def _collect(self) -> None:
        rec = self._futures.popleft().result()
        self.records[rec.info.file] = rec.slim()

    def close(self) -> Manifest:
        try:
            try:
                for split in list(self._pending):
                    self._flush(split)
                while self._futures:
                    self._collect()
            finally:
                self._shutdown()
            self.manifest = finalize(
                self.root, self.records.values(), image_format=self.image_format,
                class_names=self.class_names, provenance=self.provenance,
            )
        finally:
            self._lock.release()
        return self.manifest

    def _abandon(self) -> None:
        """After a failure: when nothing was written, leave no ``_work/`` behind; then release
        the lock (which removes the directory too if it created it and it is empty)."""
        try:
            work = self.root / WORK_DIR
            if self._new_work and not any(work.glob("*.parquet")) and \
                    not (self.root / MANIFEST_NAME).exists():
                shutil.rmtree(work, ignore_errors=True)
        finally:
            self._lock.release()

    def __enter__(self) -> DatasetWriter:
        return self

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self._shutdown()
            finally:
                self._abandon()
