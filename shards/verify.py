"""``cifar5m verify``: recompute checksums and counts; optionally decode every image."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
from tqdm import tqdm

from cifar5m.errors import (
    ChecksumMismatchError,
    CorruptShardError,
    ManifestError,
    ShardNotFoundError,
)
from shards import checksum, codec, ustar
from shards.format import INDEX_NAME, LABEL_EXT
from shards.index import read_index, shard_runs
from shards.manifest import ShardInfo, load_manifest
from shards.relabel import shard_label_column


@dataclass
class VerifyReport:
    shards: int = 0
    samples: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    decoded: int = 0


def _read_checked(path: Path, *, size: int, sha256: str) -> bytes:
    if not path.is_file():
        raise ShardNotFoundError(f"{path} is missing; the manifest lists it (re-download or re-create)")
    data = path.read_bytes()
    if len(data) != size:
        raise ChecksumMismatchError(
            f"{path} has {len(data)} bytes, the manifest says {size}: truncated or altered; "
            f"re-download or re-create it"
        )
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ChecksumMismatchError(
            f"{path} does not match its sha256 in the manifest: corrupted; re-download or re-create it"
        )
    return data


def _check_members(data: bytes, info: ShardInfo, rows, *, image_format: str, where: Path) -> None:
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


def _check_digests(data: bytes, rows, *, where: Path) -> None:
    """Every image member against its ``image_xxh3`` (an index that predates it: skipped)."""
    want = checksum.column(rows)
    if want is None:
        return
    offsets = rows["image_offset"].to_numpy()
    bad = checksum.first_bad_at(data, offsets, rows["image_size"].to_numpy(), want)
    if bad >= 0:
        raise checksum.mismatch(str(where), rows["key"][bad].as_py(), int(offsets[bad]))


def _decode_all(data: bytes, rows, *, image_format: str, where: Path, classes: int,
                shard_labels: str = "label") -> int:
    """Decode every member; ``shard_labels`` is the index column the ``.cls`` members hold
    (``label`` unless the dataset was relabelled: see ``shards.relabel``)."""
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


def verify_dataset(root: str | Path, *, decode: bool = False, progress: bool = True) -> VerifyReport:
    """Check every file against the manifest and every shard against the index.

    Raises the first problem found as a typed error naming the file (and offset).
    """
    root = Path(root)
    manifest = load_manifest(root)
    for f in manifest.files:
        _read_checked(root / f.file, size=f.bytes, sha256=f.sha256)
    index = read_index(root / INDEX_NAME)
    report = VerifyReport()
    shard_labels = shard_label_column(index)
    for split, total in manifest.totals().items():
        rows = int(pc.sum(pc.equal(index["split"], split)).as_py() or 0)
        if rows != total["samples"]:
            raise ManifestError(f"{root}: index has {rows} {split} rows, the manifest {total['samples']}")
    try:
        runs = shard_runs(index["shard"])
    except ValueError as exc:
        raise ManifestError(f"{root / INDEX_NAME}: {exc}; re-create the dataset") from None
    for info in tqdm(manifest.shards, desc="verify", unit="shard", disable=not progress):
        path = root / info.file
        data = _read_checked(path, size=info.bytes, sha256=info.sha256)
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
