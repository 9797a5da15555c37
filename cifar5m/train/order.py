"""The deterministic global order of a stream, and how it is cut into per-rank batches.

Everything here is pure arithmetic on sample positions: no I/O, no torch. The order
depends only on (seed, the split's shard sample counts, block and window sizes), never
on world size or workers, which is what makes elastic resumption exact:

* the *pool* is what one epoch draws from: the whole split (ideal world) or the fixed
  N-sample subset (real world);
* epoch ``e`` is a permutation of the pool seeded by ``(seed, e)``; the stream is the
  concatenation of epochs 0, 1, ... (ideal world stops at the end of epoch 0 unless
  ``wrap``);
* global batch ``b`` is stream items ``[b*B, (b+1)*B)``; rank ``r`` of ``R`` takes the
  contiguous slice ``r`` of it (``B/R`` items); DataLoader worker ``w`` of ``W`` takes
  runs of ``g`` consecutive batches: run ``w``, ``w + W``, ... counted from ``start``.

The ideal-world permutation is block-level: contiguous runs of ``block`` samples inside
a shard are shuffled as units, then samples are shuffled inside windows of ``window``
consecutive stream items, so one window reads ``window / block`` byte ranges (64 at
the defaults) while imported shards sorted by class still mix within every batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from cifar5m.core.errors import NotEnoughSamplesError, StreamConfigError

# 256 samples of PNG are ~1 MB of a shard: one range read amortises request latency.
DEFAULT_BLOCK = 256
# 16384 samples = 64 blocks from (up to) 64 shards are mixed into every window.
DEFAULT_WINDOW = 16384
# Distinct SeedSequence streams so the subset, ideal and real orders never correlate.
_IDEAL, _REAL, _SUBSET = 0, 1, 2


def block_order(counts: Sequence[int], *, seed: int, epoch: int, block: int = DEFAULT_BLOCK,
                window: int = DEFAULT_WINDOW) -> np.ndarray:
    """A permutation of ``range(sum(counts))``: blocks shuffled, then samples within windows.

    ``counts`` are the samples per shard, in split order (shards hold consecutive
    positions); no block crosses a shard boundary.
    """
    _, starts, stops = block_grid(counts, block=block)
    total = int(np.sum(counts))
    rng = np.random.default_rng([seed, epoch, _IDEAL])
    perm = rng.permutation(len(starts))
    lens = (stops - starts)[perm]
    offs = np.cumsum(lens) - lens
    order = np.arange(total, dtype=np.int64) + np.repeat(starts[perm] - offs, lens)
    full = total // window * window
    if full:
        order[:full] = rng.permuted(order[:full].reshape(-1, window), axis=1).ravel()
    order[full:] = rng.permutation(order[full:])
    return order


def block_grid(counts: Sequence[int], *, block: int, shard_start: Sequence[int] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blocks of a split, in split order: (blocks per shard, first position, stop position).

    Each shard is cut into runs of ``block`` samples from its start (the last one may be
    shorter), so no block crosses a shard boundary. ``shard_start`` defaults to shards
    holding consecutive positions.
    """
    counts = np.asarray(counts, np.int64)
    first = np.cumsum(counts) - counts if shard_start is None else np.asarray(shard_start, np.int64)
    per_shard = -(-counts // block)
    owner = np.repeat(np.arange(len(counts)), per_shard)
    nth = np.arange(int(per_shard.sum()), dtype=np.int64) - np.repeat(np.cumsum(per_shard) - per_shard, per_shard)
    starts = first[owner] + nth * block
    return per_shard, starts, np.minimum(starts + block, (first + counts)[owner])


def full_order(size: int, *, seed: int, epoch: int) -> np.ndarray:
    """A uniform permutation of ``range(size)`` (the real world's in-memory subset)."""
    return np.random.default_rng([seed, epoch, _REAL]).permutation(size).astype(np.int64)


def choose_subset(labels: np.ndarray, n: int, *, seed: int, class_balanced: bool,
                  num_classes: int, where: str) -> np.ndarray:
    """Sorted split positions of the real world's fixed N-sample subset."""
    if n <= 0:
        raise StreamConfigError(f"--n must be positive for the real world, got {n}")
    if n > len(labels):
        raise NotEnoughSamplesError(
            f"the real world asked for a subset of n={n} samples but {where} holds {len(labels)}; "
            f"use n <= {len(labels)}")
    if class_balanced:
        from cifar5m.shards.index import balanced_subset

        return balanced_subset(labels, n, seed=seed, num_classes=num_classes)
    rng = np.random.default_rng([seed, 0, _SUBSET])
    return np.sort(rng.choice(len(labels), n, replace=False)).astype(np.int64)


class Plan:
    """Global batches of a run: which pool items batch ``b`` holds, per rank."""

    def __init__(self, *, pool_size: int, batch_size: int, world_size: int, total_batches: int,
                 seed: int, counts: Sequence[int] | None, block: int = DEFAULT_BLOCK,
                 window: int = DEFAULT_WINDOW) -> None:
        self.pool_size = pool_size
        self.batch_size = batch_size
        self.world_size = world_size
        self.total_batches = total_batches
        self.seed = seed
        self.counts = None if counts is None else tuple(int(c) for c in counts)
        self.block = block
        self.window = window
        self._epochs: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:  # workers recompute epochs instead of unpickling 40 MB
        return {**self.__dict__, "_epochs": {}}

    @property
    def per_rank(self) -> int:
        return self.batch_size // self.world_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # a batch straddles at most two epochs
                self._epochs.pop(min(self._epochs))
            if self.counts is None:
                order = full_order(self.pool_size, seed=self.seed, epoch=epoch)
            else:
                order = block_order(self.counts, seed=self.seed, epoch=epoch, block=self.block,
                                    window=self.window)
            self._epochs[epoch] = order
        return self._epochs[epoch]

    def items(self, start: int, stop: int) -> np.ndarray:
        """Pool indices of stream items ``[start, stop)`` (may span epochs)."""
        parts = []
        while start < stop:
            epoch, offset = divmod(start, self.pool_size)
            take = min(stop - start, self.pool_size - offset)
            parts.append(self.epoch_order(epoch)[offset : offset + take])
            start += take
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def global_batch(self, b: int) -> np.ndarray:
        return self.items(b * self.batch_size, (b + 1) * self.batch_size)

    def rank_start(self, b: int, rank: int) -> int:
        """Stream item index of the first item of ``rank``'s part of global batch ``b``."""
        return b * self.batch_size + rank * self.per_rank

    def rank_batch(self, b: int, rank: int) -> np.ndarray:
        start = self.rank_start(b, rank)
        return self.items(start, start + self.per_rank)

    def worker_groups(self, start: int, worker: int, num_workers: int, *,
                      group: int = 1) -> Iterator[range]:
        """Runs of ``group`` consecutive global batches that worker ``worker`` produces when a
        pass begins at ``start``: runs ``worker, worker + W, ...`` of the batches from ``start``
        on; the DataLoader's in-order round robin then hands them out in stream order."""
        first = start + worker * group
        while first < self.total_batches:
            yield range(first, min(first + group, self.total_batches))
            first += num_workers * group
