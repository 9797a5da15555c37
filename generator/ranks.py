"""torchrun integration: which process am I, and a barrier across all of them.

Ranks come from torchrun's RANK / WORLD_SIZE / LOCAL_RANK. The only collective we
need is a barrier (before finalising, and after rank 0 opened the output), so a
gloo group is enough and works on CPU-only hosts and across nodes alike; CUDA
work never goes through it. Its timeout is a week: ranks meet only at the start
and the end of a run that can take many hours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

GROUP_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, shard_number: int) -> bool:
        """Ranks take shards round-robin: disjoint, and balanced to within one shard."""
        return shard_number % self.world == self.rank


def from_env() -> Rank:
    env = os.environ
    return Rank(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def init(rank: Rank) -> None:
    if rank.world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank.rank, world_size=rank.world, timeout=GROUP_TIMEOUT)


def barrier(rank: Rank) -> None:
    if rank.world > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_ok(rank: Rank, ok: bool) -> bool:
    """Whether every rank reported ``ok`` (so all ranks stop together on an error)."""
    if rank.world == 1:
        return ok
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return int(flag) == 0


def close(rank: Rank) -> None:
    if rank.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
