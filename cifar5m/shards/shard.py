"""One shard: encoding samples into a tar, and the shard's index part in ``_work/``.

A shard is built in memory (~40 MB at 10k PNG samples), written to a temp name and
renamed; then its index rows go to ``_work/{split}-{index:06d}.parquet`` (temp +
rename) with the shard's size and sha256. A shard without its part is unfinished.
``write_shard`` is usable on its own, so several processes can write disjoint shards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cifar5m.core.atomic import atomic_write_bytes
from cifar5m.core.errors import ChecksumMismatchError, InvalidImageError, ShardNotFoundError
from cifar5m.shards import checksum, codec, ustar
from cifar5m.shards.format import (
    IMAGE_FORMATS,
    LABEL_EXT,
    TAR_BLOCK,
    WORK_DIR,
    check_key,
    shard_name,
)
from cifar5m.shards.index import SCHEMA, rows_to_table
from cifar5m.shards.manifest import FileInfo, ShardInfo

_SHARD_META = b"cifar5m.shard"


class Sample(NamedTuple):
    """One sample to write. Optional fields end up in the index's nullable columns."""

    key: str
    image: np.ndarray
    label: int
    confidence: float | None = None
    seed: int | None = None
    cond_label: int | None = None
    probs: Sequence[float] | None = None


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard: its manifest entry and its index rows.

    The rows are either in memory (``table``) or in the shard's ``_work/`` part file
    (``part``); writers keep only the path, so memory stays flat at millions of rows.
    """

    info: ShardInfo
    table: pa.Table | None = None
    part: Path | None = None

    def rows(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The index rows (only ``columns`` when given: a part file is read column by column)."""
        if self.table is not None:
            return self.table if columns is None else self.table.select(list(columns))
        return pq.read_table(self.part, columns=columns).replace_schema_metadata(None)

    def slim(self) -> ShardRecord:
        """The same record without rows in memory (they stay in the part file)."""
        return ShardRecord(self.info, None, self.part) if self.part is not None else self


def part_path(root: Path, shard_file: str) -> Path:
    return Path(root) / WORK_DIR / (Path(shard_file).stem + ".parquet")


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_info(root: Path, name: str) -> FileInfo:
    """The manifest entry (size, sha256) of the dataset file ``root/name`` (index, card)."""
    return FileInfo(name, (root / name).stat().st_size, sha256_file(root / name))


def encode_shard(samples: Iterable[Sample], *, image_format: str, where: str) -> tuple[bytes, dict]:
    """Build a shard's bytes and its index columns (positions left at 0)."""
    chunks: list[bytes] = []
    cols: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    pos = 0
    for s in samples:
        key = check_key(s.key)
        try:
            image = codec.check_image(s.image, where=f"{where}: sample {key!r}")
        except ValueError as exc:
            raise InvalidImageError(str(exc)) from None
        for ext, data, prefix in (
            (image_format, codec.encode_image(image, image_format), "image"),
            (LABEL_EXT, codec.encode_label(s.label), "label"),
        ):
            chunks.append(ustar.member(f"{key}.{ext}", data))
            cols[f"{prefix}_offset"].append(pos + TAR_BLOCK)
            cols[f"{prefix}_size"].append(len(data))
            if prefix == "image":
                cols[checksum.COLUMN].append(checksum.digest(data))
            pos += len(chunks[-1])
        cols["key"].append(key)
        cols["label"].append(int(s.label))
        cols["confidence"].append(s.confidence)
        cols["seed"].append(s.seed)
        cols["cond_label"].append(s.cond_label)
        cols["probs"].append(None if s.probs is None else [float(p) for p in s.probs])
    chunks.append(ustar.END_OF_ARCHIVE)
    data = b"".join(chunks)
    cols[checksum.GROUP_COLUMN] = checksum.group_digests(data, cols["image_offset"], cols["image_size"])
    return data, cols


def build_shard(split: str, index: int, samples: Iterable[Sample], *, image_format: str,
                where: str) -> tuple[bytes, ShardInfo, pa.Table]:
    """Shard ``index`` of ``split`` in memory: its bytes, manifest entry and index rows."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}; use one of {IMAGE_FORMATS}")
    name = shard_name(split, index)
    data, cols = encode_shard(samples, image_format=image_format, where=where)
    if not cols["key"]:
        raise ValueError(f"shard {name} would hold no samples")
    n = len(cols["key"])
    cols.update(split=[split] * n, shard=[name] * n, position=[0] * n)
    info = ShardInfo(
        file=name, split=split, samples=n, first_key=cols["key"][0], bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return data, info, rows_to_table(cols)


def write_shard(
    root: str | Path, split: str, index: int, samples: Iterable[Sample], *, image_format: str
) -> ShardRecord:
    """Encode ``samples`` into shard ``index`` of ``split`` under ``root``, atomically."""
    root = Path(root)
    where = str(root / shard_name(split, index))
    data, info, table = build_shard(split, index, samples, image_format=image_format, where=where)
    atomic_write_bytes(root / info.file, data)
    return ShardRecord(info, table, write_part(root, info, table))


def part_bytes(info: ShardInfo, table: pa.Table) -> bytes:
    """A part file's bytes: the shard's index rows, with its size and sha256 in the metadata."""
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata({_SHARD_META: json.dumps(asdict(info))}), sink)
    return sink.getvalue().to_pybytes()


def part_info(metadata: pq.FileMetaData) -> ShardInfo:
    """The shard a part file describes, from its parquet footer."""
    return ShardInfo(**json.loads(metadata.metadata[_SHARD_META]))


def write_part(root: Path, info: ShardInfo, table: pa.Table) -> Path:
    """Persist a finished shard's index rows (and its size and sha256) in ``_work/``."""
    (root / WORK_DIR).mkdir(exist_ok=True)
    path = part_path(root, info.file)
    atomic_write_bytes(path, part_bytes(info, table))
    return path


def load_records(root: str | Path, *, check: bool = True,
                 on_damaged: Callable[[Path, str], None] | None = None) -> dict[str, ShardRecord]:
    """Finished shards of an unfinished write, by file name.

    With ``check``, each shard's size and sha256 are compared with its part. A missing
    or damaged shard raises ``ShardNotFoundError`` / ``ChecksumMismatchError``, unless
    ``on_damaged`` is given: then the shard and its part are deleted (it will be written
    again like a never-written one) and ``on_damaged(shard_path, what_was_wrong)`` is called.
    """
    root = Path(root)
    records: dict[str, ShardRecord] = {}
    for part in sorted((root / WORK_DIR).glob("*.parquet")):
        info = part_info(pq.read_metadata(part))
        shard = root / info.file
        if not shard.is_file():
            problem: Exception = ShardNotFoundError(f"{shard} is missing but {part} says it was written")
            why = "is missing but its _work/ part remains"
        elif check and (shard.stat().st_size != info.bytes or sha256_file(shard) != info.sha256):
            problem = ChecksumMismatchError(
                f"{shard} does not match the checksum recorded when it was written; "
                f"delete it and {part}, then re-run to rewrite it")
            why = "does not match its recorded sha256"
        else:
            records[info.file] = ShardRecord(info, None, part)
            continue
        if on_damaged is None:
            raise problem
        shard.unlink(missing_ok=True)
        part.unlink()
        on_damaged(shard, why)
    return records
