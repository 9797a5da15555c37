"""Producing one rank's batches: in the main process, in a thread, or in DataLoader workers.

A producer turns global batch indices into decoded batches of its rank (``cifar5m.train.order``
says which positions, ``cifar5m.train.sample_reader`` reads them). DataLoader workers send runs of
consecutive batches as one message (``Packed``) that the main process splits again,
in stream order.
"""

from __future__ import annotations

from collections.abc import Iterator
from multiprocessing.reduction import ForkingPickler
from typing import NamedTuple

import numpy as np
import torch
from torch.multiprocessing.reductions import rebuild_storage_filename

from cifar5m.train.order import Plan
from cifar5m.train.sample_reader import SampleReader

# Remote blocks are fetched for the next batch and the one FETCH_DISTANCE on: the batches between
# were that far on earlier, so every block is asked for ~4 decodes before it is needed. A
# window's first batch needs all its ~64 blocks at once, so the batch 3/4 of a window on is
# also looked ahead: behind a 50 ms round trip 64 blocks take ~0.3 s, 4 batches ~35 ms (the
# block store keeps two windows of blocks: this one and the next fit).
FETCH_DISTANCE = 4


class StreamBatch(NamedTuple):
    images: torch.Tensor  # (B, 3, 32, 32) uint8
    labels: torch.Tensor  # (B,) int64
    keys: list[str] | None
    step: int  # global batch index


def _reduce_batch(batch: StreamBatch):
    """Between processes (a DataLoader's workers), images and labels travel as one tensor in
    torch's file_system shared memory, whatever the process-wide sharing strategy. torch's
    default (file_descriptor) passes each tensor's memory as a file descriptor over a socket:
    ~0.5 ms per tensor for the main process on a 2-core VM, which capped a plain DataLoader at
    ~156k img/s with two tensors per 256-image batch (benchmarks/results/2026-12-08-dataloader.md)."""
    images, labels = batch.images, batch.labels
    if images.dtype != torch.uint8 or labels.dtype != torch.int64 or images.is_cuda or labels.is_cuda:
        return StreamBatch, tuple(batch)
    flat = torch.empty(images.numel() + 8 * labels.numel(), dtype=torch.uint8)
    flat[: images.numel()].view(images.shape).copy_(images)
    flat[images.numel():].view(torch.int64).copy_(labels)
    storage = flat.untyped_storage()
    manager, handle, size = storage._share_filename_cpu_()
    storage._shared_incref()  # alive until the receiver has mapped it (torch's protocol)
    return _rebuild_batch, (manager, handle, size, tuple(images.shape), batch.keys, batch.step)


def _rebuild_batch(manager: bytes, handle: bytes, size: int, shape: tuple[int, ...],
                   keys: list[str] | None, step: int) -> StreamBatch:
    storage = rebuild_storage_filename(torch.UntypedStorage, manager, handle, size)
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    n = int(np.prod(shape))
    return StreamBatch(flat[:n].view(shape), flat[n:].view(torch.int64), keys, step)


ForkingPickler.register(StreamBatch, _reduce_batch)


class BatchProducer:
    """Builds the batches of one rank; lives in the main process or in a worker."""

    def __init__(self, plan: Plan, rank: int, reader: SampleReader, subset: np.ndarray | None,
                 return_keys: bool) -> None:
        self.plan, self.rank, self.reader = plan, rank, reader
        self.subset, self.return_keys = subset, return_keys
        self.far = max(FETCH_DISTANCE, plan.window // plan.batch_size)

    def positions(self, b: int) -> np.ndarray:
        items = self.plan.rank_batch(b, self.rank)
        return items if self.subset is None else self.subset[items]

    def _decode(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
        """Images, labels and (if asked for) keys of ``positions``."""
        cat = self.reader.catalog
        keys = cat.key_list(positions) if self.return_keys else None
        images = torch.from_numpy(self.reader.images(positions))
        return images, torch.from_numpy(cat.labels[positions]), keys

    def packed(self, run: range, following: range | None) -> Packed:
        positions = np.concatenate([self.positions(b) for b in run])
        if following is not None:
            self.reader.lookahead(np.concatenate([self.positions(b) for b in following]))
        return Packed(*self._decode(positions), run.start, len(run))

    def batch(self, b: int, *, next_b: int | None = None) -> StreamBatch:
        positions = self.positions(b)
        if next_b is not None:  # the next batch's blocks, and those FETCH_DISTANCE batches on
            for later in sorted({next_b, next_b + FETCH_DISTANCE - 1, next_b + self.far - 1}):
                if later < self.plan.total_batches:
                    self.reader.lookahead(self.positions(later))
        return StreamBatch(*self._decode(positions), b)


class Packed(NamedTuple):
    """Consecutive batches of one rank in one message from a worker: one shared-memory
    transfer instead of ``count`` (torch's per-message cost, ~1-3 ms here, capped workers
    at ~60k img/s with one 256-image batch per message)."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str] | None
    first: int
    count: int


def unpack(packed: Packed) -> Iterator[StreamBatch]:
    per = len(packed.labels) // packed.count if packed.count else 0
    for i in range(packed.count):
        part = slice(i * per, (i + 1) * per)
        keys = packed.keys[part] if packed.keys is not None else None
        yield StreamBatch(packed.images[part], packed.labels[part], keys, packed.first + i)


class WorkerDataset(torch.utils.data.IterableDataset):
    def __init__(self, producer: BatchProducer, start: int, group: int) -> None:
        self.producer, self.start, self.group = producer, start, group

    def __iter__(self) -> Iterator[Packed]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        runs = self.producer.plan.worker_groups(self.start, worker, workers, group=self.group)
        run = next(runs, None)
        while run is not None:
            following = next(runs, None)
            yield self.producer.packed(run, following)
            run = following
