"""``cifar5m verify``: recompute checksums and counts; optionally decode every image.

Files are read through the dataset's byte source (``cifar5m.shards.source.open_source``), as every
other reader of the format reads them: a local directory, an http(s) URL (the project's
server or any static one) or another fsspec URL. One whole file is in memory at a time
(a local shard is read into a buffer of its own, not kept mapped by the source).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
from tqdm import tqdm

from cifar5m.core.errors import (
    ChecksumMismatchError,
    CorruptShardError,
    ManifestError,
    ShardNotFoundError,
)
from cifar5m.shards import checksum, codec, ustar
from cifar5m.shards.catalog import index_input, read_manifest
from cifar5m.shards.format import INDEX_NAME, LABEL_EXT
from cifar5m.shards.index import read_index, shard_runs
from cifar5m.shards.label_columns import shard_label_column
from cifar5m.shards.manifest import ShardInfo
from cifar5m.shards.source import Source, open_source


@dataclass
class VerifyReport:
    shards: int = 0
    samples: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    decoded: int = 0


def _read_checked(source: Source, file: str, *, where: str | Path, size: int,
                  sha256: str) -> bytes | bytearray | memoryview:
    try:
        data = source.read_whole(file)
    except (ShardNotFoundError, IsADirectoryError):
        raise ShardNotFoundError(f"{where} is missing; the manifest lists it (re-download or re-create)") from None
    if len(data) != size:
        raise ChecksumMismatchError(
            f"{where} has {len(data)} bytes, the manifest says {size}: truncated or altered; "
            f"re-download or re-create it"
        )
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ChecksumMismatchError(
            f"{where} does not match its sha256 in the manifest: corrupted; re-download or re-create it"
        )
    return data


def _check_members(data: bytes, info: ShardInfo, rows, *, image_format: str, where: str | Path) -> None:
    """The tar's members must be exactly the index rows, in order, at the recorded offsets."""
    keys = rows["key"].to_pylist()
    expected = []
    for key, io_, is_, lo, ls in zip(keys, rows["image_offset"].to_pylist(), rows["image_size"].to_pylist(),
                                     rows["label_offset"].to_pylist(), rows["label_size"].to_pylist(),
                                     strict=True):
        expected += [(f"{key}.{image_format}", io_, is_), (f"{key}.{LABEL_EXT}", lo, ls)]
    try:
        members = list(ustar.iter_members(data, where=str(where)))
    except ValueError as exc:
        raise CorruptShardError(str(exc)) from None
    if len(members) != len(expected) or len(keys) != info.samples:
        raise CorruptShardError(
            f"{where}: {len(members) // 2} samples in the tar, {len(keys)} in the index, "
            f"{info.samples} in the manifest"
        )
    for got, want in zip(members, expected, strict=True):
        if (got.name, got.offset, got.size) != want:
            raise CorruptShardError(f"{where} at byte {got.offset}: member {got.name!r} does not match the index ({want[0]!r})")


def _check_digests(data: bytes, rows, *, where: str | Path) -> None:
    """Every image member against its ``image_xxh3`` (an index that predates it: skipped)."""
    want = checksum.column(rows)
    if want is None:
        return
    offsets = rows["image_offset"].to_numpy()
    bad = checksum.first_bad_at(data, offsets, rows["image_size"].to_numpy(), want)
    if bad >= 0:
        raise checksum.mismatch(str(where), rows["key"][bad].as_py(), int(offsets[bad]))


def _decode_all(data: bytes, rows, *, image_format: str, where: str | Path, classes: int,
                shard_labels: str = "label") -> int:
    """Decode every member; ``shard_labels`` is the index column the ``.cls`` members hold
    (``label`` unless the dataset was relabelled: see ``cifar5m.shards.label_columns``)."""
    view = memoryview(data)
    labels = rows[shard_labels].to_pylist()
    current = rows["label"].to_numpy()
    if len(current) and not (current.min() >= 0 and current.max() < classes):
        raise CorruptShardError(f"{where}: the index has labels outside [0, {classes})")
    for off, size, loff, lsize, label in zip(rows["image_offset"].to_pylist(), rows["image_size"].to_pylist(),
                                             rows["label_offset"].to_pylist(), rows["label_size"].to_pylist(),
                                             labels, strict=True):
        try:
            codec.decode_image(view[off : off + size], image_format)
            stored = codec.decode_label(view[loff : loff + lsize])
        except ValueError as exc:
            raise CorruptShardError(f"{where} at byte {off}: {exc}") from None
        if stored != label or not 0 <= label < classes:
            raise CorruptShardError(f"{where} at byte {loff}: label {stored} (index says {label}, {classes} classes)")
    return len(labels)


def verify_dataset(root: str | Path, *, decode: bool = False, progress: bool = True,
                   storage_options: dict | None = None) -> VerifyReport:
    """Check every file against the manifest and every shard against the index.

    ``root`` is a dataset directory or URL (``storage_options`` as for ``cifar5m.shards.reader.Dataset``).
    Raises the first problem found as a typed error naming the file (and offset).
    """
    source = open_source(str(root), storage_options=storage_options)
    root = Path(root) if source.local else source.url

    def where(file: str) -> str | Path:
        return root / file if source.local else f"{root}/{file}"

    manifest = read_manifest(source)
    index_data = None
    for f in manifest.files:
        data = _read_checked(source, f.file, where=where(f.file), size=f.bytes, sha256=f.sha256)
        if f.file == INDEX_NAME:
            index_data = data  # checked: parsed below, not read again
        del data
    if index_data is None:  # a manifest that does not list its index
        index_data = source.read_whole(INDEX_NAME)
    index = read_index(index_input(index_data), where=str(where(INDEX_NAME)))
    del index_data
    report = VerifyReport()
    shard_labels = shard_label_column(index)
    for split, total in manifest.totals().items():
        rows = int(pc.sum(pc.equal(index["split"], split)).as_py() or 0)
        if rows != total["samples"]:
            raise ManifestError(f"{root}: index has {rows} {split} rows, the manifest {total['samples']}")
    try:
        runs = shard_runs(index["shard"])
    except ValueError as exc:
        raise ManifestError(f"{where(INDEX_NAME)}: {exc}; re-create the dataset") from None
    for info in tqdm(manifest.shards, desc="verify", unit="shard", disable=not progress):
        path = where(info.file)
        data = _read_checked(source, info.file, where=path, size=info.bytes, sha256=info.sha256)
        run = runs.get(info.file, slice(0, 0))
        rows = index.slice(run.start, run.stop - run.start)
        _check_members(data, info, rows, image_format=manifest.image_format, where=path)
        _check_digests(data, rows, where=path)
        if decode:
            report.decoded += _decode_all(data, rows, image_format=manifest.image_format, where=path,
                                          classes=len(manifest.class_names), shard_labels=shard_labels)
        report.shards += 1
        report.samples[info.split] = report.samples.get(info.split, 0) + info.samples
        report.bytes += info.bytes
    return report
