"""The batches one rank trains on, on its device: the only part of a run that differs
between the worlds. The real world copies its N samples to the device once and gathers
batches there by position; the ideal world copies every fresh batch from the stream, one
batch ahead on a side CUDA stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cifar5m.core.atomic import atomic_write_bytes
from cifar5m.train.config import TrainConfig
from cifar5m.train.distributed import Runtime

if TYPE_CHECKING:
    from cifar5m.train.stream import SampleStream

class TrainData:
    """The training batches of one rank, as uint8 ``(B, 3, 32, 32)`` + int64 on the device."""

    def __init__(self, stream: SampleStream, config: TrainConfig, rt: Runtime,
                 keys_path: str | os.PathLike | None = None) -> None:
        self.stream, self.config, self.rt, self.keys_path = stream, config, rt, keys_path
        self.real = config.world == "real"
        self.keys_file = None
        self._next = None
        self._iter = None
        self._side = None  # CUDA stream that copies the next ideal-world batch
        if self.real:
            images, labels, keys = stream.real_subset()
            self.images = images.to(rt.device)  # real_subset(): contiguous uint8, int64, a list
            self.labels = labels.to(rt.device)
            self.keys = list(keys)

    @classmethod
    def open(cls, config: TrainConfig, rt: Runtime, *,
             keys_path: str | os.PathLike | None = None) -> TrainData:
        from cifar5m.train.stream import SampleStream, StreamConfig

        # The fields both configs have (world, n, batch_size, steps, seed, num_workers, ...) are
        # taken by name; the rest says how this rank reads.
        shared = {f.name for f in dataclasses.fields(StreamConfig)} & {
            f.name for f in dataclasses.fields(config)}
        cfg = StreamConfig(source=config.data, **{k: getattr(config, k) for k in shared} | dict(
            n=config.n if config.world == "real" else None,
            rank=rt.rank if rt.world_size > 1 else None,
            world_size=rt.world_size if rt.world_size > 1 else None,
            wrap=config.wrap and config.world == "ideal",
            return_keys=config.record_keys and config.world == "ideal",
            pin_memory=rt.device.type == "cuda"))
        return cls(SampleStream(cfg), config, rt, keys_path)

    def _source(self) -> Iterator[Any]:
        """Positions into the subset (real world) or stream batches (ideal world)."""
        return self.stream.iter_index_batches() if self.real else iter(self.stream)

    def _fetch(self) -> tuple[Any, ...]:
        """Next batch of the stream as (images, labels, keys or None), already on the device;
        or on its way there, with the side CUDA stream that copies it as a fourth item."""
        if self._iter is None:
            self._iter = self._source()
        item = next(self._iter)
        if self.real:
            pos = torch.as_tensor(item, dtype=torch.int64).to(self.rt.device)
            keys = [self.keys[i] for i in pos.tolist()] if self.config.record_keys else None
            return self.images[pos], self.labels[pos], keys
        x, y = torch.as_tensor(item.images), torch.as_tensor(item.labels, dtype=torch.int64)
        if self.rt.device.type != "cuda":
            return x, y, item.keys
        if self._side is None:
            self._side = torch.cuda.Stream(self.rt.device)
        side = self._side
        with torch.cuda.stream(side):
            x, y = x.to(self.rt.device, non_blocking=True), y.to(self.rt.device, non_blocking=True)
        return x, y, item.keys, side

    def next_batch(self, *, copy_next: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; with ``copy_next`` the one after starts copying (not before a checkpoint,
        so the stream's state counts exactly the batches trained on)."""
        item = self._next if self._next is not None else self._fetch()
        self._next = None
        if len(item) == 4:  # wait for the side-stream copy, and keep its memory alive
            torch.cuda.current_stream(self.rt.device).wait_stream(item[3])
            item[0].record_stream(torch.cuda.current_stream(self.rt.device))
            item[1].record_stream(torch.cuda.current_stream(self.rt.device))
        if copy_next:
            with contextlib.suppress(StopIteration):
                self._next = self._fetch()
        if self.config.record_keys:
            self._record(item[2])
        return item[0], item[1]

    def _record(self, keys: Sequence[Any]) -> None:
        if self.keys_file is None:
            self.keys_file = open(self.keys_path, "a")  # noqa: SIM115 (open for the whole run)
        self.keys_file.write(" ".join(map(str, keys)) + "\n")
        self.keys_file.flush()

    def resume_keys(self, step: int) -> None:
        """Keep the keys file's first ``step`` lines (one per step): after a kill between
        checkpoints the steps past the checkpoint are trained again and logged again."""
        if not self.config.record_keys or self.keys_path is None:
            return
        path = Path(self.keys_path)
        lines = path.read_text().splitlines(keepends=True)[:step] if path.exists() else []
        atomic_write_bytes(path, "".join(lines).encode())

    def wrapped(self) -> bool:
        """Whether the ideal world repeated samples (``wrap`` and more steps than one pass)."""
        return bool(self.stream.report()["wrapped"])

    def close(self) -> None:
        if self.keys_file is not None:
            self.keys_file.close()
            self.keys_file = None

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self._iter, self._next = None, None
