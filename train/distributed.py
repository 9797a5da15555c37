"""Where a run executes: device, processes, data on the device, evaluation sets.

``Runtime`` hides single-process vs DDP under torchrun (``RANK``/``WORLD_SIZE`` in
the environment; NCCL on CUDA, gloo on CPU). ``TrainData`` is the only part of a
run that differs between the worlds: the real world copies its N samples to the
device once and gathers batches there by position; the ideal world copies every
fresh batch from the stream, one batch ahead on a side CUDA stream.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from cifar5m.errors import TrainConfigError
from cifar5m.ranks import from_env
from shards.atomic import atomic_write_bytes
from shards.reader import Dataset
from train.augment import prepare
from train.config import TrainConfig
from train.metrics import evaluate

if TYPE_CHECKING:
    from train.stream import SampleStream


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @classmethod
    def start(cls, *, device: str = "auto") -> Runtime:
        env = from_env()
        world, local = env.world, env.local_rank
        if device == "auto":
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise TrainConfigError(f"--device {device!r}: {exc}; use auto, cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise TrainConfigError(f"--device {device!r}, but torch sees no CUDA device here; "
                                   "use --device cpu (or auto)")
        if dev.type not in ("cpu", "cuda"):
            raise TrainConfigError(f"--device {device!r}: only cpu and cuda are supported")
        if dev.type == "cuda" and dev.index is None:  # "cuda" means this rank's GPU
            dev = torch.device("cuda", local)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            torch.backends.cudnn.benchmark = True
        if world > 1 and not dist.is_initialized():
            # Kept for the life of the process: re-creating the default group under one
            # torchrun job (bootstrap trains several runs) hung about 1 time in 3 here.
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            atexit.register(_destroy_group)
        rank = dist.get_rank() if world > 1 else 0
        return cls(dev, rank, world)

    def stop(self) -> None:
        self.barrier()  # no rank starts the next run (or exits) while another still saves

    def wrap(self, model: nn.Module, *, compile: bool) -> nn.Module:
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return torch.compile(model) if compile else model

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        if not bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather(self, obj: object) -> list:
        if self.world_size == 1:
            return [obj]
        objs: list = [None] * self.world_size
        dist.all_gather_object(objs, obj)
        return objs

    def reduce(self, sums: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(sums)
        return sums

    def progress(self, *, total: int, initial: int, unit_scale: int, enabled: bool) -> tqdm:
        return tqdm(total=total * unit_scale, initial=initial * unit_scale, unit="img",
                    unit_scale=True, disable=not enabled or self.rank != 0, dynamic_ncols=True)


class TrainData:
    """The training batches of one rank, as uint8 ``(B, 3, 32, 32)`` + int64 on the device."""

    def __init__(self, stream: SampleStream, config: TrainConfig, rt: Runtime,
                 keys_path: str | os.PathLike | None = None) -> None:
        self.stream, self.config, self.rt, self.keys_path = stream, config, rt, keys_path
        self.real = config.world == "real"
        self.keys_file = None
        self._ahead = None
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
        from train.stream import SampleStream, StreamConfig

        cfg = StreamConfig(
            source=config.data, world=config.world, n=config.n if config.world == "real" else None,
            batch_size=config.batch_size, steps=config.steps, seed=config.seed,
            rank=rt.rank if rt.world_size > 1 else None,
            world_size=rt.world_size if rt.world_size > 1 else None,
            num_workers=config.num_workers, class_balanced=config.class_balanced,
            wrap=config.wrap and config.world == "ideal",
            return_keys=config.record_keys and config.world == "ideal",
            pin_memory=rt.device.type == "cuda", storage_options=config.storage_options)
        return cls(SampleStream(cfg), config, rt, keys_path)

    def _source(self):
        return self.stream.iter_index_batches() if self.real else iter(self.stream)

    def _fetch(self):
        """Next batch of the stream, already on the device (or on its way there)."""
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

    def next_batch(self, *, ahead: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; with ``ahead`` the one after starts copying (not before a checkpoint,
        so the stream's state counts exactly the batches trained on)."""
        item = self._ahead if self._ahead is not None else self._fetch()
        self._ahead = None
        if len(item) == 4:  # wait for the side-stream copy, and keep its memory alive
            torch.cuda.current_stream(self.rt.device).wait_stream(item[3])
            item[0].record_stream(torch.cuda.current_stream(self.rt.device))
            item[1].record_stream(torch.cuda.current_stream(self.rt.device))
        if ahead:
            with contextlib.suppress(StopIteration):
                self._ahead = self._fetch()
        if self.config.record_keys:
            self._record(item[2])
        return item[0], item[1]

    def _record(self, keys) -> None:
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

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
        self._iter, self._ahead = None, None


@dataclass
class EvalSet:
    name: str
    images: torch.Tensor  # this rank's slice, uint8 NCHW on the device
    labels: torch.Tensor


def load_eval_set(source: str, split: str, *, limit: int | None, rt: Runtime,
                  storage_options: dict | None = None) -> EvalSet:
    """The first ``limit`` samples of a split; each rank keeps every world_size-th one."""
    _, images, labels = Dataset(source, storage_options=storage_options).split(split).load(limit=limit)
    if not len(labels):
        raise TrainConfigError(f"{source} split {split!r} is empty; evaluate on another split")
    x = images.transpose(0, 3, 1, 2)[rt.rank :: rt.world_size]
    y = labels[rt.rank :: rt.world_size]
    return EvalSet(split, torch.from_numpy(np.ascontiguousarray(x)).to(rt.device),
                   torch.from_numpy(y).to(rt.device))


class Evaluator:
    """Computes a log row's metrics: test split, CIFAR-10 test, real-world train set."""

    def __init__(self, sets: dict[str, EvalSet], config: TrainConfig, rt: Runtime) -> None:
        self.sets, self.config, self.rt = sets, config, rt

    @classmethod
    def build(cls, config: TrainConfig, rt: Runtime, data: TrainData) -> Evaluator:
        sets = {"test": load_eval_set(config.data, config.test_split, limit=config.test_limit, rt=rt,
                                      storage_options=config.storage_options)}
        if config.cifar10_test:
            sets["cifar10"] = load_eval_set(config.cifar10_test, "test", limit=None, rt=rt)
        if data.real:
            stop = config.train_eval_limit or len(data.labels)
            sets["train"] = EvalSet("train", data.images[:stop][rt.rank :: rt.world_size],
                                    data.labels[:stop][rt.rank :: rt.world_size])
        return cls(sets, config, rt)

    def run(self, model: nn.Module) -> dict[str, float]:
        row = {}
        cl = self.config.channels_last
        for name, s in self.sets.items():
            metrics = evaluate(model, s.images, s.labels, batch_size=self.config.eval_batch_size,
                               prepare=lambda x, cl=cl: prepare(x, channels_last=cl),
                               autocast=lambda: self.rt.autocast(self.config.precision),
                               reduce=self.rt.reduce)
            row.update({f"{name}_{k}": v for k, v in metrics.items()})
        return row
