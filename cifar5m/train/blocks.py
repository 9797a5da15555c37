"""Whole plan blocks of remote shards: fetched concurrently, kept LRU, fetched ahead.

The ideal-world order is block-shuffled (``cifar5m.train.order``): a window of the order touches
``window / block`` blocks of ``block`` consecutive samples, and the first batch of a
window touches nearly all of them. Fetching whole blocks (~1 MB of PNG, ~1.2 MB of npy
each) turns ~256 sample reads into one request. Blocks of batches ahead are fetched by
a background thread while this batch decodes (socket reads release the GIL); every
block in flight has its own future, so a batch waits only for the blocks it needs, not
for the whole lookahead. A lock guards the dicts, never a network wait.

npy blocks are received into slots of one arena (``Source.fetch_into``: HTTP reads the
socket straight into the slot) and checked once on arrival (every header, vectorised),
so a batch is one strided gather over the arena, whatever blocks it spans: the
per-sample Python path cost ~3.3 us/sample, a gather per block (~64 per batch)
~6 us/sample, the arena gather ~1 us/sample. Where each arena block starts is kept in
an array indexed by a global block number, so a batch finds its blocks with one
vectorised lookup instead of ``np.unique`` and a dict per batch; when the arena is
full the least recently used unpinned block gives its slot up (before, the new block
went to the per-sample path and so did every batch touching it: 21% of batches over
HTTP at window 4096, measured).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from cifar5m.shards import checksum, codec
from cifar5m.shards.catalog import Catalog
from cifar5m.shards.source import Source
from cifar5m.train.order import block_grid

Key = int  # global block number: the blocks of shard 0, then those of shard 1, ...


class Held(NamedTuple):
    start: int  # file offset of data[0]
    data: memoryview
    slot: int  # npy: data's copy in the arena (checked), or -1: read it sample by sample


class BlockStore:
    def __init__(self, catalog: Catalog, source: Source, *, block: int, keep: int) -> None:
        self.catalog, self.source, self.block, self.keep = catalog, source, block, keep
        self.npy = catalog.image_format == "npy"
        self._blocks: OrderedDict[Key, Held] = OrderedDict()
        self._inflight: dict[Key, Future] = {}
        self._pinned: set[Key] = set()  # the blocks of the batch being decoded now
        self._unused: set[Key] = set()  # fetched ahead, no batch has used them yet
        self._arena: np.ndarray | None = None  # npy: slots of slot_bytes, allocated lazily
        self._free: list[int] = []
        counts, self._starts, self._stops = block_grid(catalog.shard_count, block=block,
                                                       shard_start=catalog.shard_start)
        self._first = np.cumsum(counts) - counts  # global index of each shard's first block
        self._base: np.ndarray | None = None  # per global block: arena offset of file offset 0
        self._in_arena: np.ndarray | None = None  # per global block: held in an arena slot
        self._windows: np.ndarray | None = None
        self._lock = threading.Lock()
        self._pid = -1
        self.fetched = 0

    def __getstate__(self) -> dict:  # blocks, lock and thread belong to one process
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_pool")}
        return {**state, "_blocks": OrderedDict(), "_inflight": {}, "_pinned": set(), "_unused": set(), "_pid": -1,
                "_arena": None, "_free": [], "_base": None, "_in_arena": None, "_windows": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _ids(self, rows: np.ndarray) -> np.ndarray:
        """The block of each row (one vectorised lookup: the (shard, block) tuples and
        ``np.unique`` it replaced cost ~25 us per 256 rows, 3 times per batch)."""
        shards = self.catalog.shard_id[rows]
        return self._first[shards] + (rows - self.catalog.shard_start[shards]) // self.block

    def _rows(self, key: Key) -> range:
        return range(int(self._starts[key]), int(self._stops[key]))

    def _request(self, key: Key) -> tuple[str, int, int]:
        cat, rows = self.catalog, self._rows(key)
        last = rows[-1]
        return (cat.shards[int(cat.shard_id[rows[0]])], int(cat.image_offset[rows[0]]),
                int(cat.image_offset[last] + cat.image_size[last]))

    def _checked(self, key: Key, start: int, data: memoryview) -> bool:
        """Whether every member of an npy block is a whole plain npy matching its digest
        (else the per-sample path reads it and names the error: a short shard, a foreign
        header, a changed byte)."""
        rows = self._rows(key)
        offsets = self.catalog.image_offset[rows.start:rows.stop] - start
        sizes = self.catalog.image_size[rows.start:rows.stop]
        buf = np.frombuffer(data, np.uint8)
        if not np.all(sizes == codec.NPY_SIZE) or int(offsets.max()) + codec.NPY_SIZE > buf.size:
            return False
        return codec.npy_headers_ok(buf, offsets) and self._digests_ok(rows, offsets, sizes, data)

    def _digests_ok(self, rows: range, offsets: np.ndarray, sizes: np.ndarray, data: memoryview) -> bool:
        """The block's members against the index: one digest per group of 64 members when
        blocks are whole groups (block % 64 == 0, as by default), else one per member."""
        cat = self.catalog
        if self.block % checksum.GROUP:
            return checksum.first_bad_at(data, offsets, sizes, cat.digests[rows.start:rows.stop]) < 0
        # Blocks start on group boundaries here, so the block's groups are the shard's.
        got = checksum.group_digests(data, offsets.tolist(), sizes.tolist())[:: checksum.GROUP]
        first = int(cat.group_of(np.array([rows.start]))[0])
        return got == cat.group_digests[first : first + len(got)].tolist()

    def _slot_bytes(self) -> int:
        """The largest block's bytes (an arena slot)."""
        cat, firsts, lasts = self.catalog, self._starts, self._stops - 1
        return int((cat.image_offset[lasts] + cat.image_size[lasts] - cat.image_offset[firsts]).max())

    def _slots(self, n: int) -> list[int]:
        """Under the lock: ``n`` free arena slots for npy blocks (-1 where none is free)."""
        if not self.npy:
            return [-1] * n
        if self._arena is None:
            slots = self.keep * 3 // 2  # pinned and just-fetched blocks may exceed keep for a while
            self._arena = np.empty((slots, self._slot_bytes()), np.uint8)  # pages touched lazily
            self._free = list(range(slots))
            self._base = np.zeros(len(self._starts), np.int64)
            self._in_arena = np.zeros(len(self._base), bool)
            self._windows = codec.npy_image_windows(self._arena.reshape(-1))
        out = []
        for _ in range(n):
            if not self._free:
                self._reclaim()
            out.append(self._free.pop() if self._free else -1)
        return out

    def _reclaim(self) -> None:
        """Under the lock: free the slot of the least recently used unpinned block, if any."""
        for key in self._spare(set()):
            if self._blocks[key].slot >= 0:
                self._drop(key)
                return

    def _drop(self, key: Key) -> None:
        """Under the lock: forget a held block and free its arena slot."""
        held = self._blocks.pop(key)
        self._unused.discard(key)
        if held.slot >= 0:
            self._free.append(held.slot)
            self._in_arena[key] = False

    def _held(self, key: Key, start: int, data: memoryview, slot: int) -> Held:
        """A fetched block; an npy block that fails its check leaves the arena (per-sample path)."""
        if slot >= 0 and len(data) <= self._arena.shape[1] and self._checked(key, start, data):
            return Held(start, data, slot)  # data is a view of the slot (fetch_into)
        return Held(start, memoryview(bytes(data)) if slot >= 0 else data, -1)

    def _claim(self, keys: set[Key]) -> tuple[list[Key], list[Future]]:
        """Under the lock: ``(keys this caller must fetch, futures of keys already in flight)``."""
        with self._lock:
            mine = sorted(k for k in keys if k not in self._blocks and k not in self._inflight)
            waits = [self._inflight[k] for k in keys if k in self._inflight]
            for k in mine:
                self._inflight[k] = Future()
        return mine, waits

    def _fetch(self, keys: list[Key]) -> None:
        """Fetch ``keys`` (claimed by this caller) and resolve their futures. npy blocks are
        received straight into arena slots (no copy after the socket for HTTP)."""
        if not keys:
            return
        requests = [self._request(k) for k in keys]
        with self._lock:
            slots = self._slots(len(keys))
        try:
            outs = [memoryview(self._arena[s]) if s >= 0 else None for s in slots]
            datas = self.source.fetch_into(requests, outs)  # the network wait, outside the lock
            held = [self._held(k, r[1], memoryview(d), s) for k, r, d, s in zip(
                keys, requests, datas, slots, strict=True)]
        except BaseException as exc:
            with self._lock:
                self._free.extend(s for s in slots if s >= 0)
                for k in keys:
                    self._inflight.pop(k).set_exception(exc)
            raise
        with self._lock:
            self._free.extend(s for s, h in zip(slots, held, strict=True) if s >= 0 and h.slot < 0)
            for k, h in zip(keys, held, strict=True):
                self._blocks[k] = h
                self._unused.add(k)
                if h.slot >= 0:
                    self._base[k], self._in_arena[k] = h.slot * self._arena.shape[1] - h.start, True
                self._inflight.pop(k).set_result(None)
            self.fetched += len(keys)
            self._evict(set(keys))

    def _evict(self, fresh: set[Key]) -> None:
        """Drop least recently used blocks beyond ``keep``, never pinned or fresh ones."""
        for k in self._spare(fresh)[: max(0, len(self._blocks) - self.keep)]:
            self._drop(k)

    def _spare(self, fresh: set[Key]) -> list[Key]:
        """Under the lock: blocks that may go, least recently used first; those fetched ahead
        and not used yet last (a window's blocks, fetched a window early, would otherwise
        be older than the last window's, which its batches kept touching)."""
        spare = [k for k in self._blocks if k not in self._pinned and k not in fresh]
        return [k for k in spare if k not in self._unused] + [k for k in spare if k in self._unused]

    def ensure(self, rows: np.ndarray) -> None:
        """Make the blocks of ``rows`` present and pinned until the next ``ensure``; waits only
        for those of them still in flight (re-raising a lookahead's error here)."""
        keys = set(self._ids(rows).tolist())
        with self._lock:
            self._pinned = keys
        self._present(keys)
        with self._lock:
            self._unused -= keys
            for k in keys:
                self._blocks.move_to_end(k)

    def _present(self, keys: set[Key]) -> None:
        mine, waits = self._claim(keys)
        self._fetch(mine)
        for future in waits:
            future.result()

    def lookahead(self, rows: np.ndarray) -> None:
        """Start fetching the blocks of ``rows`` that are neither held nor in flight."""
        if self._pid != os.getpid():  # threads do not survive fork
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cifar5m-blocks")
            self._pid = os.getpid()
        mine, _ = self._claim(set(self._ids(rows).tolist()))
        if mine:
            future = self._pool.submit(self._fetch, mine)
            future.add_done_callback(lambda f: f.exception())  # errors surface via the key futures

    def slices(self, rows: np.ndarray, ranges: list[tuple[int, int]]) -> list:
        """The bytes ``ranges`` of ``rows`` out of held blocks (fetching any evicted one)."""
        keys = self._ids(rows).tolist()
        with self._lock:
            missing = {k for k in keys if k not in self._blocks}
        if missing:  # evicted since ensure (more blocks than keep): fetch again
            self._present(missing)
        with self._lock:
            held = [self._blocks[k] for k in keys]
        return [h.data[a - h.start : b - h.start] for h, (a, b) in zip(held, ranges, strict=True)]

    def npy_images(self, rows: np.ndarray) -> np.ndarray | None:
        """Images of npy ``rows`` (N, 3072) by one gather over the arena, after ``ensure(rows)``
        (which pins their blocks, so no other thread reuses their slots meanwhile); None
        when a block is not in the arena (the per-sample path then reads or reports it)."""
        if not self.npy or self._arena is None:
            return None
        blocks = self._ids(rows)
        with self._lock:
            if not self._in_arena[blocks].all():
                return None
            base = self._base[blocks]
        return self._windows[base + self.catalog.image_offset[rows]]
