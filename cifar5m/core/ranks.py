"""Which process am I: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, read in one place for the
generator (``cifar5m.generator.rendezvous``) and the trainer and stream (``train``). Imports no torch."""

from __future__ import annotations

import os
from dataclasses import dataclass


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
    """This process's rank from torchrun's environment; rank 0 of 1 outside torchrun."""
    env = os.environ
    return Rank(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
