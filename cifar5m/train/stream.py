"""The training loader: exactly-once fresh samples (ideal world) or a reused subset (real world).

    from cifar5m.train.stream import StreamConfig, SampleStream
    stream = SampleStream(StreamConfig(source="data/cifar5m", world="ideal", batch_size=512))
    for batch in stream:            # StreamBatch(images uint8 NCHW, labels int64, keys, step)
        ...
    state = stream.state_dict()     # resume later, also with another world size / workers

The order is a pure function of (seed, the split's shards), see ``cifar5m.train.order``; the
state is the number of global batches consumed, so a restore is exact whatever the
world size or number of DataLoader workers on either side, as long as the global batch
size is the same. Workers produce batches ``start + w, start + w + W, ...``; the
DataLoader's in-order round robin hands them out as ``start, start + 1, ...``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from cifar5m.core.errors import NotEnoughSamplesError, StreamConfigError, StreamStateError
from cifar5m.shards.catalog import Catalog
from cifar5m.shards.source import open_source
from cifar5m.train.batch_producer import BatchProducer, StreamBatch, WorkerDataset, unpack
from cifar5m.train.cache import DecodedCache
from cifar5m.train.config import StreamConfig
from cifar5m.train.distributed import resolve_rank
from cifar5m.train.order import Plan, choose_subset
from cifar5m.train.prefetch import prefetched
from cifar5m.train.sample_reader import SampleReader
from cifar5m.train.stream_state import STATE_KEYS, STATE_VERSION, checked_state, loader_stream_state

__all__ = ["SampleStream", "StreamBatch", "StreamConfig"]
log = logging.getLogger("cifar5m.stream")
GROUP_IMAGES = 1024  # images per worker message (whole batches, at least one)

def _pinned(batch: StreamBatch) -> StreamBatch:
    return batch._replace(images=batch.images.pin_memory(), labels=batch.labels.pin_memory())


class SampleStream(torch.utils.data.IterableDataset):
    """An iterable of this rank's batches; see the module docstring. Also a PyTorch
    ``IterableDataset``: under ``DataLoader(stream, batch_size=None, num_workers=k)`` worker w
    makes global batches ``next + w, next + w + k, ...`` and the loader's in-order round robin
    hands them out in the stream's order (docs/streaming.md, "DataLoader")."""

    def __init__(self, config: StreamConfig, *, catalog: Catalog | None = None,
                 transform: Callable[[StreamBatch], Any] | None = None) -> None:
        """``catalog``: ``config.split`` of ``config.source`` already loaded (``Catalog.load``),
        so several streams over one dataset read its index once; by default it is loaded here.
        ``transform(batch)`` runs on every batch where it is made: in the DataLoader worker,
        the prefetch thread, or (with ``config.num_workers``) as the batch arrives."""
        self.config = c = config
        self.transform = transform
        if c.world not in ("ideal", "real"):
            raise StreamConfigError(f"world must be 'ideal' or 'real', got {c.world!r}")
        self.rank, self.world_size = resolve_rank(c.rank, c.world_size)
        if c.batch_size < 1 or c.batch_size % self.world_size:
            raise StreamConfigError(
                f"the global batch size {c.batch_size} must be a positive multiple of the world "
                f"size {self.world_size} (each rank takes batch_size // world_size)")
        if c.seed < 0 or (c.steps is not None and c.steps < 0):
            raise StreamConfigError(f"seed and steps must be >= 0, got {c.seed} and {c.steps}")
        self.source = open_source(c.source, storage_options=c.storage_options)
        if catalog is not None and (catalog.split != c.split or catalog.url != self.source.url):
            raise StreamConfigError(f"the catalog given is split {catalog.split!r} of {catalog.url}, "
                                    f"the stream's is split {c.split!r} of {self.source.url}")
        self.catalog = Catalog.load(self.source, c.split) if catalog is None else catalog
        where = f"split {c.split!r} of {c.source}"
        self.subset: np.ndarray | None = None
        if c.world == "real":
            if c.n is None:
                raise StreamConfigError("the real world needs n (the subset size)")
            self.subset = choose_subset(self.catalog.labels, c.n, seed=c.seed,
                                        class_balanced=c.class_balanced,
                                        num_classes=len(self.catalog.class_names), where=where)
        pool = len(self.catalog) if self.subset is None else len(self.subset)
        if pool < c.batch_size and (c.world == "real" or c.steps is None):
            # would be 0 batches (steps=None), or batches holding one sample twice (real world)
            what = f"the real-world subset n={pool}" if c.world == "real" else f"{where} ({pool} samples)"
            raise StreamConfigError(
                f"{what} is smaller than the global batch size {c.batch_size}; use a batch "
                f"size <= {pool} or more samples")
        total = pool // c.batch_size if c.steps is None else c.steps
        if c.world == "ideal" and total * c.batch_size > pool:
            if not c.wrap:
                raise NotEnoughSamplesError(
                    f"asked for {total} steps x batch {c.batch_size} = {total * c.batch_size} fresh "
                    f"samples but {where} holds {pool}; use steps <= {pool // c.batch_size}, a "
                    f"bigger dataset, or --wrap (StreamConfig wrap=True; samples then repeat)")
            log.warning("wrap=True: %d samples asked from %d; the order restarts with a new "
                        "permutation after every %d samples", total * c.batch_size, pool, pool)
        self.plan = Plan(pool_size=pool, batch_size=c.batch_size, world_size=self.world_size,
                         total_batches=total, seed=c.seed,
                         counts=self.catalog.shard_count if self.subset is None else None,
                         block=c.block, window=c.window)
        cache = DecodedCache(c.cache_dir, cap_bytes=c.cache_bytes) if c.cache_dir else None
        self.cache = cache
        ideal = self.subset is None  # the real world reads its scattered subset once, by sample
        self.reader = SampleReader(self.catalog, self.source, cache if ideal else None,
                                   block=c.block if ideal else None,
                                   keep_blocks=max(16, 9 * c.window // (4 * c.block)))  # 2 windows and their edges
        self.next_batch = 0
        self._resumed_from = 0
        self._delivered = 0
        self._subset_data: tuple[torch.Tensor, torch.Tensor, list[str]] | None = None
        self._live = threading.Lock()  # held by the one running iterator (see _exclusive)
        self._worker: tuple[int, int, int] | None = None  # in a DataLoader worker: (id, of, next)

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader's spawned workers get a copy
        return {k: v for k, v in self.__dict__.items() if k != "_live"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _live=threading.Lock())

    # --- iteration --------------------------------------------------------------------
    def __len__(self) -> int:
        return self.plan.total_batches - self.next_batch

    def _producer(self) -> BatchProducer:
        return BatchProducer(self.plan, self.rank, self.reader, self.subset, self.config.return_keys)

    def _pin(self) -> bool:
        return self.config.pin_memory and torch.cuda.is_available()

    def _batches(self) -> Iterator[tuple[int, Any]]:
        """``(global batch, batch after the transform)`` of this rank from ``next_batch`` on."""
        c, start, pin = self.config, self.next_batch, self._pin()
        if self.subset is not None:
            for b in range(start, self.plan.total_batches):
                batch = self._real_batch(b)
                yield b, self._transformed(_pinned(batch) if pin else batch)
        elif c.num_workers == 0:
            producer = self._producer()

            def make(b: int) -> tuple[int, Any]:  # runs in the prefetch thread, pinning included
                batch = producer.batch(b, next_b=b + 1)
                return b, self._transformed(_pinned(batch) if pin else batch)

            yield from prefetched(make, range(start, self.plan.total_batches), c.prefetch)
        else:
            group = max(1, GROUP_IMAGES // self.plan.per_rank)
            loader = torch.utils.data.DataLoader(
                WorkerDataset(self._producer(), start, group), batch_size=None,
                num_workers=c.num_workers, pin_memory=pin, prefetch_factor=max(1, c.prefetch))
            for packed in loader:
                yield from ((batch.step, self._transformed(batch)) for batch in unpack(packed))

    def _real_batch(self, b: int) -> StreamBatch:
        """Real world: global batch ``b`` of this rank, gathered from ``real_subset()``."""
        images, labels, keys = self.real_subset()
        idx = torch.from_numpy(self.plan.rank_batch(b, self.rank))
        return StreamBatch(images[idx], labels[idx],
                           [keys[i] for i in idx.tolist()] if self.config.return_keys else None, b)

    def _rank_indices(self, start: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Real world: ``(b, this rank's positions into real_subset())`` from batch ``start`` on."""
        for b in range(start, self.plan.total_batches):
            yield b, torch.from_numpy(self.plan.rank_batch(b, self.rank))

    def _exclusive(self, items: Iterator) -> Iterator:
        """Run ``items`` as the only live pass: two passes would both start at next_batch and
        deliver the same batches twice, so a second one raises while the first runs."""
        if not self._live.acquire(blocking=False):
            raise StreamStateError(
                "this SampleStream is already being iterated (another iterator is still open); "
                "finish or close() the first one, or make a second SampleStream for another pass")
        try:
            yield from items
        finally:
            self._live.release()

    def __iter__(self) -> Iterator[StreamBatch]:
        info = torch.utils.data.get_worker_info()
        if info is not None:  # this copy runs in a DataLoader worker
            return self._worker_batches(info.id, info.num_workers)
        return self._exclusive(self._iterate())

    def _transformed(self, batch: StreamBatch) -> Any:
        return batch if self.transform is None else self.transform(batch)

    def _worker_batches(self, worker: int, workers: int) -> Iterator[Any]:
        """DataLoader worker ``worker`` of ``workers``: every ``workers``-th global batch from
        this worker's next one; ``next_batch`` is what the stream has consumed once the loader
        has handed this worker's batch over (in order, so all batches before it too)."""
        if self.config.num_workers:
            raise StreamConfigError(
                f"StreamConfig(num_workers={self.config.num_workers}) inside a DataLoader worker: "
                f"use the DataLoader's workers or the stream's, not both (num_workers=0 here)")
        first = self.next_batch + worker
        if self._worker is not None:  # restored from this worker's own state
            if self._worker[:2] != (worker, workers):
                raise StreamStateError(
                    f"this state is DataLoader worker {self._worker[0]} of {self._worker[1]}, the "
                    f"loader now runs {workers}: load the loader's whole state_dict() into the "
                    f"stream (stream.load_state_dict) and make a new loader instead")
            first = self._worker[2]
        producer = None if self.subset is not None else self._producer()
        for b in range(first, self.plan.total_batches, workers):
            self._worker = (worker, workers, b + workers)
            batch = self._real_batch(b) if producer is None else producer.batch(b, next_b=b + workers)
            self.next_batch = b + 1
            self._delivered += 1
            yield self._transformed(batch)

    def _iterate(self) -> Iterator[Any]:
        for b, batch in self._batches():
            self.next_batch = b + 1  # counted when handed over: prefetch is not consumed
            self._delivered += 1
            yield batch

    def iter_positions(self, *, advance: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """``(step, split positions)`` of this rank's batches without reading them.

        ``advance=True`` advances the state like ``__iter__`` (when handed over);
        ``advance=False`` leaves it to the caller, who calls ``delivered(step)`` once the
        batch is safely out (``--format tar``: written and flushed).
        """
        return self._exclusive(self._positions(advance))

    def _positions(self, advance: bool) -> Iterator[tuple[int, np.ndarray]]:
        producer = self._producer()
        for b in range(self.next_batch, self.plan.total_batches):
            positions = producer.positions(b)
            if advance:
                self.delivered(b)
            yield b, positions

    def delivered(self, step: int) -> None:
        """Count global batch ``step`` as consumed; it must be the next one."""
        if step != self.next_batch:
            raise StreamStateError(f"batch {step} marked delivered but the next batch is "
                                   f"{self.next_batch}; mark batches in order, once each")
        self.next_batch = step + 1
        self._delivered += 1

    def global_positions(self, b: int) -> np.ndarray:
        """Split positions of global batch ``b`` (all ranks, in rank order); no I/O."""
        items = self.plan.global_batch(b)
        return items if self.subset is None else self.subset[items]

    # --- real world -------------------------------------------------------------------
    def real_subset(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The fixed subset: images (N, 3, 32, 32) uint8, labels (N,) int64, keys (sorted by position)."""
        if self.subset is None:
            raise StreamConfigError("real_subset() exists only in the real world (world='real')")
        if self._subset_data is None:
            def load() -> np.ndarray:  # self.reader: no cache, per-sample reads in the real world
                return self.reader.images(self.subset)

            if self.cache is not None:
                name = f"subset:{self.catalog.fingerprint()}:{self.config.seed}:" \
                       f"{int(self.config.class_balanced)}:{len(self.subset)}"
                key = hashlib.sha256(name.encode()).hexdigest()  # the cache keeps 32 hex digits
                images = np.asarray(self.cache.get(key, len(self.subset), load))
            else:
                images = load()
            self._subset_data = (torch.from_numpy(np.array(images)),
                                 torch.from_numpy(self.catalog.labels[self.subset]),
                                 self.catalog.key_list(self.subset))
        return self._subset_data

    def iter_index_batches(self) -> Iterator[torch.Tensor]:
        """This rank's batches as int64 positions into ``real_subset()``; advances the state."""
        if self.subset is None:
            raise StreamConfigError("iter_index_batches() exists only in the real world")
        return self._exclusive(self._index_batches())

    def _index_batches(self) -> Iterator[torch.Tensor]:
        for b, idx in self._rank_indices(self.next_batch):
            self.next_batch = b + 1
            self._delivered += 1
            yield idx

    # --- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The state: global batches consumed, and what the order depends on. In a DataLoader
        worker it also says which worker it is and its next batch (torchdata's
        StatefulDataLoader keeps one per worker and gives each back to its worker)."""
        c = self.config
        state = {"version": STATE_VERSION, "next_batch": self.next_batch,
                 **{k: getattr(c, k) for k in STATE_KEYS},
                 "dataset": self.catalog.fingerprint(), "total_batches": self.plan.total_batches,
                 "world_size": self.world_size, "num_workers": c.num_workers}
        info = torch.utils.data.get_worker_info()
        if info is not None:
            _, _, after = self._worker or (0, 0, self.next_batch + info.id)
            state["loader_worker"] = [info.id, info.num_workers, after]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``, or from a torchdata ``StatefulDataLoader``'s whole
        ``state_dict()`` (then a new loader over this stream may run any number of workers)."""
        state = checked_state(loader_stream_state(state), self.state_dict())
        self.next_batch = self._resumed_from = int(state["next_batch"])
        worker = state.get("loader_worker")
        if worker is not None and torch.utils.data.get_worker_info() is None:
            raise StreamStateError(
                "this is one DataLoader worker's state; load the loader's whole state_dict() "
                "(StatefulDataLoader.state_dict()) into the stream instead")
        self._worker = tuple(worker) if worker is not None else None

    def report(self) -> dict[str, Any]:
        p, c = self.plan, self.config
        asked = p.total_batches * p.batch_size
        return {
            "world": c.world, "source": c.source, "split": c.split, "split_size": len(self.catalog),
            "pool_size": p.pool_size, "batch_size": p.batch_size, "per_rank_batch": p.per_rank,
            "rank": self.rank, "world_size": self.world_size, "num_workers": c.num_workers,
            "total_batches": p.total_batches, "resumed_from": self._resumed_from,
            "next_batch": self.next_batch, "delivered_batches": self._delivered,
            "delivered_samples": self._delivered * p.per_rank,
            "dropped_tail": max(0, p.pool_size - asked) if c.world == "ideal" or c.steps is None else 0,
            "epochs": asked / p.pool_size if p.pool_size else 0.0,
            "wrapped": c.world == "ideal" and asked > p.pool_size,
        }

