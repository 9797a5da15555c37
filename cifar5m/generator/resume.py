"""What an output already holds, checked against this run: the same settings, and a count that
only grows. Used for local outputs (``cifar5m.generator.pipeline``) and URL outputs (``cifar5m.generator.store``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cifar5m.core.errors import ConfigMismatchError
from cifar5m.generator.plan import ShardPlan
from cifar5m.shards.writer import check_fingerprint


def refuse_other_settings(where: str, old_fp: dict[str, Any] | None, fp: dict[str, Any]) -> None:
    if old_fp is None or old_fp == fp:
        return
    if not old_fp:
        raise ConfigMismatchError(f"{where} holds a dataset not made by cifar5m generate (its manifest "
                                  f"has no fingerprint); choose another --out")
    check_fingerprint(where, old_fp, fp)


def fitting(where: str, have: Mapping[str, int], plan: list[ShardPlan]) -> dict[str, int]:
    """The shards of ``have`` (file -> samples) to keep for ``plan``; refuses a smaller count."""
    sizes = {p.file: p.size for p in plan}
    too_big = [f for f, n in have.items() if f not in sizes or n > sizes[f]]
    if too_big:
        total = sum(have.values())
        raise ConfigMismatchError(
            f"{where} already holds {total:,} samples, more than --count {sum(sizes.values()):,} "
            f"plans (e.g. {sorted(too_big)[0]}); datasets only grow: pass --count >= {total:,}")
    # A partial last train shard of a smaller count is regenerated at its new size.
    return {f: n for f, n in have.items() if n == sizes[f]}
