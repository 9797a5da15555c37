"""``cifar5m generate``: check everything, then sample, label and write shards.

Order of work (nothing is written before step 3):

1. every rank checks the config, the model files and the labeler; loads the UNet;
2. rank 0 alone checks the output and any dataset already there (settings must
   match; count may only grow);
3. rank 0 opens the output (``shards.writer.begin``: keeps finished shards after
   checking their sha256; damaged ones are deleted and regenerated) and tells the
   other ranks which shards are kept (before that they read nothing: rank 0 may be
   deleting damaged shards);
4. each rank samples its shards (round-robin) while a thread pool encodes and writes
   finished ones (``write_shard``: PNG/zlib release the GIL, so this overlaps sampling);
5. all ranks report success; if all succeeded, rank 0 writes index, card and (last)
   manifest.

An fsspec URL output (``--out s3://...``) follows the same steps with no local
output directory: each rank uploads its own shards and rank 0 holds a lease on the
prefix (``generator.store``).
"""

from __future__ import annotations

import functools
import json
import os
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from cifar5m.errors import (
    ConfigMismatchError,
    GenerationError,
    ModelError,
    OutputNotWritableError,
)
from generator import defaults, ranks
from generator.config import CONFIG_NAME, GenerateConfig, fingerprint
from generator.plan import FILTER_STRIDE, ShardPlan, plan_shards
from generator.store import is_url, run_to_store
from shards.format import CIFAR10_CLASSES, MANIFEST_NAME, WORK_DIR
from shards.lock import DirectoryLock, holder
from shards.manifest import Manifest, atomic_write_bytes, load_manifest
from shards.writer import (
    STATE_NAME,
    ShardRecord,
    begin,
    check_fingerprint,
    load_records,
    part_path,
    write_shard,
)

NUM_CLASSES = len(CIFAR10_CLASSES)


def local_root(cfg: GenerateConfig) -> Path:
    return Path(cfg.out.removeprefix("file://")).expanduser()


def check_writable(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise OutputNotWritableError(f"output {root} exists and is not a directory")
    parent = root
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"output {root} is not writable ({parent} does not allow it); "
                                     f"choose another --out")


def parts(root: Path) -> dict[str, Path]:
    """Shard file -> its ``_work/`` part, for every part (its shard may be gone)."""
    out = {}
    for part in sorted((root / WORK_DIR).glob("*.parquet")):
        name = part.stem + ".tar"
        if part_path(root, name) == part:
            out[name] = part
    return out


def existing(root: Path) -> tuple[dict[str, Any] | None, dict[str, int]]:
    """Fingerprint and shard sizes (samples) of what ``root`` holds, read without writing.

    A part whose shard file is gone does not count: that shard is regenerated. A
    finished dataset without a fingerprint (not made by generate) gets ``{}``.
    """
    fp, sizes = None, {}
    if (root / MANIFEST_NAME).is_file():
        manifest = load_manifest(root)
        fp = manifest.provenance.get("fingerprint") or {}
        sizes = {s.file: s.samples for s in manifest.shards}
    state = root / WORK_DIR / STATE_NAME
    if state.is_file():
        fp = json.loads(state.read_text())["fingerprint"]
        sizes.update({name: pq.read_metadata(part).num_rows for name, part in parts(root).items()
                      if (root / name).is_file()})
    return fp, sizes


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


def check_existing(root: Path, fp: dict[str, Any], plan: list[ShardPlan]) -> dict[str, int]:
    """Finished shards (file -> samples) to keep; refuses other settings or a smaller count."""
    old_fp, have = existing(root)
    refuse_other_settings(str(root), old_fp, fp)
    return fitting(str(root), have, plan)


def open_output(root: Path, fp: dict[str, Any]) -> dict[str, ShardRecord]:
    """``begin`` the write; the finished shards there. A lost, torn or corrupted shard of
    an unfinished run is dropped and regenerated like a never-written one (same noise,
    same bytes): it costs one shard of work, not a manual clean-up."""
    return begin(root, fp, extend=True, on_damaged=lambda shard, why: print(f"{shard} {why}: regenerating it"))


def prepare(cfg: GenerateConfig, root: Path, fp: dict[str, Any], plan: list[ShardPlan], *,
            lock: DirectoryLock) -> tuple[dict[str, ShardRecord], Manifest | None]:
    """On rank 0: take the output's lock for the whole job (a second job writing the same
    directory is refused before anything is read), check, then open the output. Returns the
    shards to keep, and the manifest instead when the dataset is already complete."""
    lock.acquire()
    keep = check_existing(root, fp, plan)
    if (root / MANIFEST_NAME).is_file() and len(keep) == len(plan) and not (root / WORK_DIR).exists():
        print(f"{root} already holds these {cfg.count:,} samples; nothing to do")
        return {}, load_manifest(root)
    records = open_output(root, fp)
    atomic_write_bytes(root / WORK_DIR / CONFIG_NAME, json.dumps(cfg.to_dict(), indent=1).encode())
    sizes = {p.file: p.size for p in plan}
    return {f: r for f, r in records.items() if sizes.get(f) == r.info.samples}, None


def open_labeler(cfg: GenerateConfig, conditional: bool, device: Any) -> Any | None:
    if cfg.labeler_path is None:
        if not conditional:
            raise ModelError(
                f"model {cfg.model!r} is unconditional, so labels must come from a labeler: pass "
                f"--labeler PATH (a directory saved by save_labeler) or --labeler builtin")
        if cfg.filtered:
            raise ModelError("--min-confidence and --balance need a --labeler")
        return None
    from generator.labeler import load_labeler

    lab = load_labeler(cfg.labeler_path, device=device)
    if lab.num_classes != NUM_CLASSES:
        raise ModelError(f"labeler {cfg.labeler_path!r} has {lab.num_classes} classes; a CIFAR-10 "
                         f"labeler has {NUM_CLASSES}")
    return lab


def run(cfg: GenerateConfig, *, progress: bool = True, storage_options: dict[str, Any] | None = None,
        break_lease: bool = False) -> Manifest | None:
    """Generate (or resume, or extend) the dataset ``cfg`` describes; the manifest on rank 0.

    ``storage_options`` (fsspec) and ``break_lease`` apply to URL outputs only.
    """
    from generator.session import Session

    rank = ranks.from_env()
    url = is_url(cfg.out)
    # Extending keeps the split of the local dataset there (one process: under torchrun each
    # node may see another local root, so the ranks could disagree; they take the default).
    previous = None if url or rank.world > 1 else existing(local_root(cfg))[0]
    cfg = defaults.with_test_count(cfg, previous)
    session = Session(cfg, rank)  # loads model config + labeler, checks shapes
    cfg = session.cfg  # with the settings the device chose
    fp = fingerprint(cfg, model_sha256=session.model_sha256, labeler_sha256=session.labeler_sha256,
                     dtype=session.dtype_name)
    plan = plan_shards(count=cfg.count, test_count=cfg.test_count, shard_size=cfg.shard_size,
                       stride=FILTER_STRIDE if cfg.filtered else 1)
    if url:
        ranks.init(rank)
        try:
            return run_to_store(cfg, session, rank, fp, plan, progress=progress,
                                storage_options=storage_options, break_lease=break_lease)
        finally:
            ranks.close(rank)
    root = local_root(cfg)
    check_writable(root)
    ranks.init(rank)
    lock = DirectoryLock(root, what="generated")  # rank 0 holds it for the whole job
    try:
        keep, done = shared_from_main(rank, functools.partial(prepare, cfg, root, fp, plan, lock=lock),
                                      locked=root)
        if done is not None:
            return done if rank.is_main else None
        todo = [p for g, p in enumerate(plan) if rank.owns(g) and p.file not in keep]
        produce_on_all_ranks(session, rank, todo, functools.partial(write_local, root, cfg.image_format),
                             progress=progress)
        if not rank.is_main:
            return None
        records = {**keep, **load_records(root, check=False)}  # kept ones checked by begin
        return session.finish(root, plan, fp, records)
    finally:
        lock.release()
        ranks.close(rank)


def write_local(root: Path, image_format: str, plan: ShardPlan, samples: list) -> ShardRecord:
    return write_shard(root, plan.split, plan.index, samples, image_format=image_format)


def produce_on_all_ranks(session: Any, rank: ranks.Rank, todo: list[ShardPlan],
                         write: Callable[[ShardPlan, list], Any], *, progress: bool) -> None:
    """Each rank writes its ``todo``; raises on every rank if any rank failed."""
    if rank.is_main and todo:  # the ranks' shares are even (the plan is dealt round-robin)
        print(session.start_line(sum(p.size for p in todo) * rank.world), flush=True)
    ok = False
    try:
        session.produce(write, todo, progress=progress)
        ok = True
    finally:  # every rank reaches this, so none waits forever for a failed one
        failed = ranks.failed_ranks(rank, ok)
    if failed:
        raise GenerationError(f"rank(s) {', '.join(map(str, failed))} of {rank.world} failed; "
                              f"re-run the same command to resume")


def shared_from_main(rank: ranks.Rank, prepare_on_main: Callable[[], tuple[Any, Any]], *,
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
            ranks.share(rank, ("failed", f"{type(exc).__name__}: {exc}"))
            raise
        ranks.share(rank, ("ok", (sorted(keep), done is not None, locked and holder(locked))))
        return keep, done
    status, value = ranks.share(rank, None)
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


def write_in_background(pool: ThreadPoolExecutor, pending: deque[Future], limit: int,
                        write: Callable[[ShardPlan, list], Any], plan: ShardPlan, samples: list) -> None:
    """Queue a shard write; block while more than ``limit`` are in flight (bounded memory)."""
    pending.append(pool.submit(write, plan, samples))
    while len(pending) > limit:
        pending.popleft().result()
