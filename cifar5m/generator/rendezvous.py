"""torchrun integration: which process am I, and the two times all ranks meet.

Ranks come from torchrun's RANK / WORLD_SIZE / LOCAL_RANK (``cifar5m.core.ranks``). Ranks meet
twice: after rank 0 opened the output (``shared_from_main``: rank 0 tells the others which
shards are kept, or that it failed) and before rank 0 finalises (``produce_on_all_ranks``
ends with ``failed_ranks``). Both carry a few
bytes, so a gloo group is enough and works on CPU-only hosts and across nodes alike;
CUDA work never goes through it. Its timeout is a week: ranks meet only at the start
and the end of a run that can take many hours.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from cifar5m.core.errors import GenerationError
from cifar5m.core.ranks import Rank, from_env  # noqa: F401 (from_env: this module's API)
from cifar5m.generator.plan import ShardPlan
from cifar5m.shards.lock import holder
from cifar5m.shards.manifest import Manifest
from cifar5m.shards.writer import ShardRecord

GROUP_TIMEOUT = timedelta(days=7)


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


def produce_on_all_ranks(session: Any, rank: Rank, todo: list[ShardPlan],
                         write: Callable[[ShardPlan, list], Any], *, progress: bool) -> None:
    """Each rank writes its ``todo``; raises on every rank if any rank failed."""
    if rank.is_main and todo:  # the ranks' shares are even (the plan is dealt round-robin)
        print(session.start_line(sum(p.size for p in todo) * rank.world), flush=True)
    ok = False
    try:
        session.produce(write, todo, progress=progress)
        ok = True
    finally:  # every rank reaches this, so none waits forever for a failed one
        failed = failed_ranks(rank, ok)
    if failed:
        raise GenerationError(f"rank(s) {', '.join(map(str, failed))} of {rank.world} failed; "
                              f"re-run the same command to resume")


def shared_from_main(rank: Rank, prepare_on_main: Callable[[], tuple[Any, Any]], *,
                     locked: Path | None = None,
                     ) -> tuple[dict[str, ShardRecord | None], Manifest | bool | None]:
    """``prepare_on_main()`` on rank 0 (kept shards, and the manifest if already complete);
    the other ranks get the kept shard names (values None) and whether the dataset is
    complete, or an error if rank 0 failed. With ``locked`` (a local output whose lock rank 0
    took in ``prepare_on_main``), the other ranks check that rank 0 holds it."""
    if rank.is_main:
        try:
            keep, done = prepare_on_main()
        except BaseException as exc:
            share(rank, ("failed", f"{type(exc).__name__}: {exc}"))
            raise
        share(rank, ("ok", (sorted(keep), done is not None, locked and holder(locked))))
        return keep, done
    status, value = share(rank, None)
    if status == "failed":
        raise GenerationError(f"rank 0 stopped before generating ({value})")
    names, done, owner = value
    if locked is not None:
        check_owner(locked, owner)
    return dict.fromkeys(names), (True if done else None)


def check_owner(root: Path, owner: dict | None) -> None:
    """On ranks > 0: where the output's lock file is visible here (same host or a shared
    file system), it must name rank 0 of this job: anything else is another writer."""
    seen = holder(root)
    if seen is not None and owner is not None and \
            (seen.get("pid"), seen.get("host")) != (owner.get("pid"), owner.get("host")):
        raise GenerationError(f"{root} is locked by PID {seen.get('pid')} on {seen.get('host')}, "
                              f"not by rank 0 of this job (PID {owner.get('pid')}); stop the other "
                              f"writer, then re-run")
