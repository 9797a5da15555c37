"""Turn split positions into decoded NCHW uint8 images, shard by shard.

Positions of one batch are grouped by shard; each shard's image members are read as
byte ranges through the index (merged into few requests by the source) and decoded:
npy by slicing the fixed 128-byte header off, PNG with Pillow. With a decoded cache,
a shard is read and decoded whole once and later batches are a row gather from a
memory map. Labels come from the index, so ``.cls`` members are never read.
"""

from __future__ import annotations

import numpy as np

from cifar5m.errors import CorruptShardError
from shards import codec
from shards.format import IMAGE_BYTES, IMAGE_SHAPE
from train.cache import DecodedCache
from train.catalog import Catalog
from train.source import Source


def group_by_shard(shard_ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``[(shard, indices into shard_ids)]``, shards ascending, indices in original order."""
    if len(shard_ids) == 0:
        return []
    order = np.argsort(shard_ids, kind="stable")
    sorted_ids = shard_ids[order]
    cuts = np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1
    return [(int(sorted_ids[a]), order[a:b]) for a, b in
            zip(np.r_[0, cuts], np.r_[cuts, len(order)], strict=True)]


class SampleReader:
    def __init__(self, catalog: Catalog, source: Source, cache: DecodedCache | None = None) -> None:
        self.catalog = catalog
        self.source = source
        self.cache = cache

    def images(self, positions: np.ndarray) -> np.ndarray:
        """Images of ``positions`` (split positions), ``(k, 3, 32, 32)`` uint8, in order."""
        positions = np.asarray(positions, np.int64)
        out = np.empty((len(positions), 3, 32, 32), np.uint8)
        cat = self.catalog
        for shard, idx in group_by_shard(cat.shard_id[positions]):
            rows = positions[idx]
            if self.cache is not None:
                count = self._count(shard)
                whole = self.cache.get(cat.shard_sha[shard], count, lambda s=shard: self.decode_shard(s))
                out[idx] = whole[rows - cat.shard_start[shard]]
            else:
                out[idx] = self.decode(shard, rows).transpose(0, 3, 1, 2)
        return out

    def _count(self, shard: int) -> int:
        stop = self.catalog.shard_start[shard + 1] if shard + 1 < len(self.catalog.shards) else len(self.catalog)
        return int(stop - self.catalog.shard_start[shard])

    def decode_shard(self, shard: int) -> np.ndarray:
        """Every sample of a shard, NCHW, from one whole-file read."""
        start = int(self.catalog.shard_start[shard])
        rows = np.arange(start, start + self._count(shard))
        return np.ascontiguousarray(self.decode(shard, rows, whole=True).transpose(0, 3, 1, 2))

    def raw(self, positions: np.ndarray) -> list[bytes]:
        """The encoded image members of ``positions`` (for re-serving as tar), in order."""
        positions = np.asarray(positions, np.int64)
        out: list[bytes] = [b""] * len(positions)
        for shard, idx in group_by_shard(self.catalog.shard_id[positions]):
            for i, data in zip(idx.tolist(), self._read(shard, positions[idx]), strict=True):
                out[i] = bytes(data)
        return out

    def _read(self, shard: int, rows: np.ndarray, *, whole: bool = False) -> list:
        cat = self.catalog
        file = cat.shards[shard]
        offsets, sizes = cat.image_offset[rows], cat.image_size[rows]
        ranges = list(zip(offsets.tolist(), (offsets + sizes).tolist(), strict=True))
        if whole:
            view = memoryview(self.source.read_file(file))
            datas = [view[a:b] for a, b in ranges]
        else:
            datas = self.source.read_ranges(file, ranges)
        for data, (a, b), row in zip(datas, ranges, rows.tolist(), strict=True):
            if len(data) != b - a:
                raise CorruptShardError(
                    f"{self.source.url}/{file} is truncated: sample {cat.keys[row].decode()!r} at "
                    f"byte offset {a} ({b - a} bytes) runs past the end of the shard (the "
                    f"manifest says {int(cat.shard_bytes[shard])} bytes); re-download it or run "
                    f"`cifar5m verify`")
        return datas

    def decode(self, shard: int, rows: np.ndarray, *, whole: bool = False) -> np.ndarray:
        """Images of split positions ``rows`` (all in ``shard``), NHWC."""
        datas = self._read(shard, rows, whole=whole)
        out = np.empty((len(rows), *IMAGE_SHAPE), np.uint8)
        flat = out.reshape(len(rows), IMAGE_BYTES)
        npy = self.catalog.image_format == "npy"
        header, hsize = codec.NPY_HEADER, codec.NPY_HEADER_SIZE
        for j, data in enumerate(datas):
            if npy and len(data) == codec.NPY_SIZE and data[:hsize] == header:
                flat[j] = np.frombuffer(data, np.uint8, IMAGE_BYTES, hsize)
                continue
            try:
                out[j] = codec.decode_image(data, self.catalog.image_format)
            except ValueError as exc:
                offset = int(self.catalog.image_offset[rows[j]])
                raise CorruptShardError(
                    f"{self.source.url}/{self.catalog.shards[shard]} at byte offset {offset} "
                    f"(sample {self.catalog.keys[rows[j]].decode()!r}): {exc}; re-download it "
                    f"or run `cifar5m verify`") from None
        return out
