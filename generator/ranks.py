"""torchrun integration: which process am I, and the two times all ranks meet.

Ranks come from torchrun's RANK / WORLD_SIZE / LOCAL_RANK. Ranks meet twice: after
rank 0 opened the output (``share``: rank 0 tells the others which shards are kept,
or that it failed) and before rank 0 finalises (``failed_ranks``). Both carry a few
bytes, so a gloo group is enough and works on CPU-only hosts and across nodes alike;
CUDA work never goes through it. Its timeout is a week: ranks meet only at the start
and the end of a run that can take many hours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

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


def share(rank: Rank, value: Any) -> Any:
    """Rank 0's ``value`` (a small picklable object) on every rank; the others pass None."""
    if rank.world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def failed_ranks(rank: Rank, ok: bool) -> list[int]:
    """The ranks that reported ``not ok``, known to every rank (so all stop together)."""
    if rank.world == 1:
        return [] if ok else [rank.rank]
    import torch
    import torch.distributed as dist

    from cifar5m.errors import GenerationError

    flags = torch.zeros(rank.world, dtype=torch.int64)
    flags[rank.rank] = 0 if ok else 1
    try:
        dist.all_reduce(flags)
    except RuntimeError as exc:  # gloo: "Connection closed by peer" when a rank or node died
        raise GenerationError(f"rank {rank.rank} of {rank.world} lost contact with the other ranks "
                              f"({str(exc).splitlines()[0][:200]}): a rank or node died; its finished "
                              f"shards are kept: re-run the same command (any number of ranks) "
                              f"to resume") from None
    return [r for r in range(rank.world) if int(flags[r])]


def close(rank: Rank) -> None:
    if rank.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
