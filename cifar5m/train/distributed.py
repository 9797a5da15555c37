"""Where a run executes: its device and processes.

``Runtime`` hides single-process vs DDP under torchrun (``RANK``/``WORLD_SIZE`` in
the environment; NCCL on CUDA, gloo on CPU). The batches a rank trains on are in
``cifar5m.train.batches``, its evaluation sets in ``cifar5m.train.evaluation``.
"""

from __future__ import annotations

import atexit
import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from cifar5m.core.errors import StreamConfigError, TrainConfigError
from cifar5m.core.ranks import from_env


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


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: explicit values, else torch.distributed, else the env, else 0/1."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    env = from_env()
    rank = env.rank if rank is None else rank
    world_size = env.world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise StreamConfigError(f"rank {rank} is not valid for world size {world_size}")
    return rank, world_size
