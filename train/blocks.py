"""Whole plan blocks of remote shards: fetched concurrently, kept LRU, one lookahead.

The ideal-world order is block-shuffled (``train.plan``): a window of the order touches
``window / block`` blocks of ``block`` consecutive samples, and the first batch of a
window touches nearly all of them. Fetching whole blocks (~1 MB of PNG each) turns
~128 sample reads into one request, and fetching the *next* batch's blocks in a
background thread while this batch decodes hides the request latency behind the
decode (urllib3 and the socket release the GIL). Only the lookahead thread and the
consumer touch the store; a lock guards the dict, never a network wait.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from train.catalog import Catalog
from train.source import Source


class BlockStore:
    def __init__(self, catalog: Catalog, source: Source, *, block: int, keep: int) -> None:
        self.catalog, self.source, self.block, self.keep = catalog, source, block, keep
        self._blocks: OrderedDict[tuple[int, int], tuple[int, memoryview]] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: Future | None = None
        self._pid = -1
        self.fetched = 0

    def __getstate__(self) -> dict:  # blocks, lock and thread belong to one process
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_pool")}
        return {**state, "_blocks": OrderedDict(), "_pending": None, "_pid": -1}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _ids(self, rows: np.ndarray) -> list[tuple[int, int]]:
        shards = self.catalog.shard_id[rows]
        blocks = (rows - self.catalog.shard_start[shards]) // self.block
        return list(zip(shards.tolist(), blocks.tolist(), strict=True))

    def _request(self, shard: int, blk: int) -> tuple[str, int, int]:
        cat = self.catalog
        first = int(cat.shard_start[shard]) + blk * self.block
        stop = int(cat.shard_start[shard + 1]) if shard + 1 < len(cat.shards) else len(cat)
        last = min(first + self.block, stop) - 1
        return cat.shards[shard], int(cat.image_offset[first]), int(cat.image_offset[last] + cat.image_size[last])

    def _fetch(self, keys: set[tuple[int, int]]) -> None:
        with self._lock:
            wanted = sorted(keys - self._blocks.keys())
        if not wanted:
            return
        requests = [self._request(*key) for key in wanted]
        datas = self.source.fetch(requests)  # the network wait, outside the lock
        with self._lock:
            for key, req, data in zip(wanted, requests, datas, strict=True):
                self._blocks[key] = (req[1], memoryview(data))
            self.fetched += len(wanted)
            for key in keys:
                if key in self._blocks:
                    self._blocks.move_to_end(key)
            while len(self._blocks) > max(self.keep, len(keys)):
                self._blocks.popitem(last=False)

    def ensure(self, rows: np.ndarray) -> None:
        """Make the blocks of ``rows`` present (after any lookahead in flight finishes)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises a lookahead's error here, in order
        self._fetch(set(self._ids(rows)))

    def lookahead(self, rows: np.ndarray) -> None:
        """Start fetching the blocks of ``rows`` in the background (at most one at a time)."""
        if self._pending is not None and not self._pending.done():
            return
        if self._pid != os.getpid():  # threads do not survive fork
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cifar5m-blocks")
            self._pid = os.getpid()
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._fetch, set(self._ids(rows)))

    def slices(self, rows: np.ndarray, ranges: list[tuple[int, int]]) -> list:
        """The bytes ``ranges`` of ``rows`` out of held blocks (fetching any evicted one)."""
        keys = self._ids(rows)
        with self._lock:
            missing = {k for k in keys if k not in self._blocks}
        if missing:
            self._fetch(missing)
        out = []
        with self._lock:
            for key, (a, b) in zip(keys, ranges, strict=True):
                start, data = self._blocks[key]
                out.append(data[a - start : b - start])
        return out
