"""Which samples go in which shard (what a run will cost: ``cifar5m.generator.cost``).

Sample indices run over the whole dataset in generation order: the test split is
samples ``[0, test_count)``, the train split ``[test_count, count)``; each split is
cut into shards of ``shard_size``. Growing ``count`` only appends train samples (and
rewrites the last, partial train shard), so extending never moves a finished sample.

Noise ids ("candidates"): a shard holding samples ``[a, a + n)`` draws candidates
``[stride * a, stride * (a + n))``. Without filters ``stride == 1``: candidate i *is*
sample i, key ``s{i:010d}``. With ``--min-confidence`` or ``--balance`` a shard may
reject candidates, so it gets ``FILTER_STRIDE`` candidates per slot, disjoint from
every other shard's, and keys are the candidate ids of the kept samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from cifar5m.shards.format import shard_name

FILTER_STRIDE = 64  # candidates per kept sample before a shard gives up (acceptance >= 1/64)


@dataclass(frozen=True)
class ShardPlan:
    """One shard to write: ``size`` samples starting at sample index ``first``."""

    split: str
    index: int
    first: int
    size: int
    stride: int

    @property
    def file(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def candidates(self) -> range:
        return range(self.stride * self.first, self.stride * (self.first + self.size))


def key_of(candidate: int) -> str:
    return f"s{candidate:010d}"


def plan_shards(*, count: int, test_count: int, shard_size: int, stride: int = 1) -> list[ShardPlan]:
    """Test shards then train shards, in generation order."""
    out: list[ShardPlan] = []
    for split, lo, hi in (("test", 0, test_count), ("train", test_count, count)):
        for index, first in enumerate(range(lo, hi, shard_size)):
            out.append(ShardPlan(split, index, first, min(shard_size, hi - first), stride))
    return out
