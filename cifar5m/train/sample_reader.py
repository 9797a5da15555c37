"""Turn split positions into decoded NCHW uint8 images, shard by shard.

Positions of one batch are grouped by shard; each shard's image members are read as
byte ranges through the index (merged into few requests by the source) and decoded:
npy by slicing the fixed 128-byte header off, PNG with Pillow. With a decoded cache,
a shard is read and decoded whole once and later batches are a row gather from a
memory map. Labels come from the index, so ``.cls`` members are never read.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from cifar5m.core.errors import CorruptShardError
from cifar5m.shards import checksum, codec
from cifar5m.shards.catalog import Catalog
from cifar5m.shards.format import IMAGE_SHAPE
from cifar5m.shards.source import Source
from cifar5m.train.blocks import BlockStore
from cifar5m.train.cache import DecodedCache


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
    """Decodes samples of one split. ``block``: remote sources fetch whole plan blocks (the
    order is block-shuffled, so a window of the order reads each block once), keeping
    the last ``keep_blocks``; None: per-sample ranges (scattered subsets)."""

    def __init__(self, catalog: Catalog, source: Source, cache: DecodedCache | None = None, *,
                 block: int | None = None, keep_blocks: int = 128) -> None:
        self.catalog = catalog
        self.source = source
        self.cache = cache
        # Blocks serve reads without a decoded cache (the cache reads whole shards): remote
        # ones, and local ones (one os.pread per block, each byte read once; BlockStore checks
        # the member digests).
        use_blocks = block and cache is None
        self.blocks = BlockStore(catalog, source, block=block, keep=keep_blocks) if use_blocks else None
        # Checked views of the last shards, as many as the source keeps mapped: a view holds
        # its map, so an unbounded dict would keep every shard of a pass mapped.
        self._views: OrderedDict[int, tuple[np.ndarray, int] | None] = OrderedDict()
        self._keep_views = getattr(source, "keep", 64)
        # Ideal world: reads run through blocks of consecutive samples, so local npy members
        # are checked by groups (_check_groups); _checked marks the positions done.
        self.sequential = block is not None
        self._checked: np.ndarray | None = None

    def __getstate__(self) -> dict:  # views are of this process's maps
        return {**self.__dict__, "_views": OrderedDict()}

    def lookahead(self, positions: np.ndarray) -> None:
        """Positions the next call will ask for: remote blocks start downloading now."""
        if self.blocks is not None:
            self.blocks.lookahead(np.asarray(positions, np.int64))

    def images(self, positions: np.ndarray) -> np.ndarray:
        """Images of ``positions`` (split positions), ``(k, 3, 32, 32)`` uint8, in order."""
        positions = np.asarray(positions, np.int64)
        out = np.empty((len(positions), 3, 32, 32), np.uint8)
        cat = self.catalog
        fetched = None
        if self.blocks is not None:
            self.blocks.ensure(positions)
            flat = self.blocks.npy_images(positions)
            if flat is not None:  # npy: one strided gather per block, headers checked on arrival
                out[:] = flat.reshape(len(positions), *IMAGE_SHAPE).transpose(0, 3, 1, 2)
                return out
        elif self.cache is None:
            fetched = self._fetch_scattered(positions)
        for shard, idx in group_by_shard(cat.shard_id[positions]):
            rows = positions[idx]
            if self.cache is not None:
                count = int(cat.shard_count[shard])
                whole = self.cache.get(cat.shard_sha[shard], count, lambda s=shard: self.decode_shard(s))
                out[idx] = whole[rows - cat.shard_start[shard]]
            else:
                datas = None if fetched is None else [fetched[i] for i in idx.tolist()]
                out[idx] = self.decode(shard, rows, datas=datas).transpose(0, 3, 1, 2)
        return out

    def decode_shard(self, shard: int) -> np.ndarray:
        """Every sample of a shard, NCHW, from one whole-file read."""
        rows = np.arange(self.catalog.shard_start[shard], self.catalog.shard_stop[shard])
        return np.ascontiguousarray(self.decode(shard, rows, whole=True).transpose(0, 3, 1, 2))

    def raw(self, positions: np.ndarray) -> list[bytes]:
        """The encoded image members of ``positions`` (for re-serving as tar), in order."""
        positions = np.asarray(positions, np.int64)
        out: list[bytes] = [b""] * len(positions)
        if self.blocks is not None:
            self.blocks.ensure(positions)
        fetched = self._fetch_scattered(positions)
        for shard, idx in group_by_shard(self.catalog.shard_id[positions]):
            datas = None if fetched is None else [fetched[i] for i in idx.tolist()]
            for i, data in zip(idx.tolist(), self._read(shard, positions[idx], datas=datas), strict=True):
                out[i] = bytes(data)
        return out

    def _fetch_scattered(self, positions: np.ndarray) -> list | None:
        """The members of ``positions`` from a remote source without blocks (a real-world
        subset is scattered) in one concurrent round; None where blocks or a local map serve."""
        if self.source.local or self.blocks is not None:
            return None
        cat = self.catalog
        offsets, sizes = cat.image_offset[positions], cat.image_size[positions]
        return self.source.fetch([(cat.shards[s], o, o + n) for s, o, n in zip(
            cat.shard_id[positions].tolist(), offsets.tolist(), sizes.tolist(), strict=True)])

    def _truncated(self, shard: int, row: int, start: int, end: int) -> CorruptShardError:
        cat = self.catalog
        return CorruptShardError(
            f"{self.source.url}/{cat.shards[shard]} is truncated: sample {cat.keys[row].decode()!r} "
            f"at byte offset {start} ({end - start} bytes) runs past the end of the shard (the "
            f"manifest says {int(cat.shard_bytes[shard])} bytes); re-download it or run "
            f"`cifar5m verify`")

    def _read(self, shard: int, rows: np.ndarray, *, whole: bool = False, datas: list | None = None) -> list:
        cat = self.catalog
        file = cat.shards[shard]
        offsets, sizes = cat.image_offset[rows], cat.image_size[rows]
        ranges = list(zip(offsets.tolist(), (offsets + sizes).tolist(), strict=True))
        if datas is None and whole:
            view = memoryview(self.source.read_file(file))
            datas = [view[a:b] for a, b in ranges]
        elif datas is None and self.blocks is not None:
            datas = self.blocks.slices(rows, ranges)
        elif datas is None:
            datas = self.source.read_ranges(file, ranges)
        for data, (a, b), row in zip(datas, ranges, rows.tolist(), strict=True):
            if len(data) != b - a:
                raise self._truncated(shard, row, a, b)
        self._raise_bad(shard, rows, checksum.first_bad(datas, cat.digests[rows]))
        return datas

    def _check_groups(self, shard: int, rows: np.ndarray, buf: np.ndarray) -> None:
        """Sequential reads (the ideal world reads every sample of a block soon): check the
        whole group of 64 members around each row not yet checked by this process, one
        digest call per group (per member: ~3x the cost), and remember it."""
        cat = self.catalog
        if self._checked is None:
            self._checked = np.zeros(len(cat), bool)
        todo = rows[~self._checked[rows]]
        if not len(todo):
            return
        view, stop = memoryview(buf), int(cat.shard_stop[shard])
        firsts = np.unique(cat.group_first(todo))
        for first, group_digest in zip(firsts.tolist(), cat.group_digests[cat.group_of(firsts)].tolist(),
                                       strict=True):
            last = min(first + checksum.GROUP, stop) - 1
            a, b = int(cat.image_offset[first]), int(cat.image_offset[last] + cat.image_size[last])
            if checksum.digest(view[a:b]) != group_digest:
                group = np.arange(first, last + 1)
                self._raise_bad(shard, group, checksum.first_bad_at(
                    buf, cat.image_offset[group], cat.image_size[group], cat.digests[group]))
                raise checksum.group_mismatch(f"{self.source.url}/{cat.shards[shard]}",
                                              cat.keys[first].decode(), cat.keys[last].decode(), a, b)
            self._checked[first : last + 1] = True

    def _raise_bad(self, shard: int, rows: np.ndarray, bad: int) -> None:
        """The checksum error for ``rows[bad]`` of ``shard`` (nothing when ``bad`` < 0)."""
        if bad >= 0:
            row = int(rows[bad])
            raise checksum.mismatch(f"{self.source.url}/{self.catalog.shards[shard]}",
                                    self.catalog.keys[row].decode(), int(self.catalog.image_offset[row]))

    def _npy_view(self, shard: int, whole: bool) -> tuple[np.ndarray, int, np.ndarray] | None:
        """``(windows, good, buffer)`` of an npy shard: ``windows[o]`` is the 3072 image bytes
        at data offset ``o``; samples from local row ``good`` on run past a truncated end.
        Kept per shard, so a batch costs one fancy index per shard (the per-sample loop
        costs ~10x more); headers are checked per gather, for the rows gathered only (a
        check of every header here touched every page of a mapped shard: a scattered
        subset read whole shards). None: use the per-sample path."""
        if shard in self._views:
            self._views.move_to_end(shard)
            return self._views[shard]
        array = getattr(self.source, "array", None)
        if array is None and not whole:
            return None
        file = self.catalog.shards[shard]
        buf = array(file) if array is not None else np.frombuffer(self.source.read_file(file), np.uint8)
        if whole and array is not None:
            self.source.will_read_whole(file)
        rows = slice(int(self.catalog.shard_start[shard]), int(self.catalog.shard_stop[shard]))
        offsets, sizes = self.catalog.image_offset[rows], self.catalog.image_size[rows]
        ends = offsets + codec.NPY_SIZE
        bad = np.flatnonzero(ends > buf.size)
        good = int(bad[0]) if len(bad) else len(offsets)
        view = None
        if buf.size >= codec.NPY_SIZE and np.all(sizes == codec.NPY_SIZE):
            view = (codec.npy_image_windows(buf), good, buf)
        if array is not None:  # whole-file reads are one-off (cache fills): do not keep them
            self._views[shard] = view
            while len(self._views) > self._keep_views:
                self._views.popitem(last=False)
        return view

    def _gather_npy(self, shard: int, rows: np.ndarray, whole: bool) -> np.ndarray | None:
        view = self._npy_view(shard, whole)
        if view is None:
            return None
        windows, good, buf = view
        cat = self.catalog
        local = rows - cat.shard_start[shard]
        if len(local) and local.max() >= good:
            j = int(np.argmax(local >= good))
            offset = int(cat.image_offset[rows[j]])
            raise self._truncated(shard, int(rows[j]), offset, offset + codec.NPY_SIZE)
        if not whole:  # a scattered gather (a view exists only for a LocalSource)
            self.source.will_read(cat.shards[shard], cat.image_offset[rows], cat.image_size[rows])
        if not codec.npy_headers_ok(buf, cat.image_offset[rows]):
            return None  # a foreign header: the per-sample path names the sample
        if whole or self.sequential:
            self._check_groups(shard, rows, buf)
        else:  # every member handed out is checked, right here
            self._raise_bad(shard, rows, checksum.first_bad_at(
                buf, cat.image_offset[rows], cat.image_size[rows], cat.digests[rows]))
        return windows[cat.image_offset[rows]].reshape(len(rows), *IMAGE_SHAPE)

    def decode(self, shard: int, rows: np.ndarray, *, whole: bool = False,
               datas: list | None = None) -> np.ndarray:
        """Images of split positions ``rows`` (all in ``shard``), NHWC."""
        npy = self.catalog.image_format == "npy"
        if npy and (fast := self._gather_npy(shard, rows, whole)) is not None:
            return fast
        datas = self._read(shard, rows, whole=whole, datas=datas)
        out = np.empty((len(rows), *IMAGE_SHAPE), np.uint8)
        for j, data in enumerate(datas):
            try:
                out[j] = codec.decode_image(data, self.catalog.image_format)
            except ValueError as exc:
                offset = int(self.catalog.image_offset[rows[j]])
                raise CorruptShardError(
                    f"{self.source.url}/{self.catalog.shards[shard]} at byte offset {offset} "
                    f"(sample {self.catalog.keys[rows[j]].decode()!r}): {exc}; re-download it "
                    f"or run `cifar5m verify`") from None
        return out
