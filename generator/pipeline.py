"""``cifar5m generate``: check everything, then sample, label and write shards.

Order of work (nothing is written before step 3):

1. check the config, the model files, the labeler, the output and any dataset
   already there (settings must match; count may only grow);
2. load the UNet;
3. rank 0 opens the output (``shards.writer.begin``: keeps finished shards after
   checking their sha256), all ranks meet at a barrier;
4. each rank samples its shards (round-robin) while a thread pool encodes and writes
   finished ones (``write_shard``: PNG/zlib release the GIL, so this overlaps sampling);
5. all ranks meet again; rank 0 writes index, card and (last) manifest, then uploads
   if the output is an fsspec URL.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cifar5m.errors import ConfigMismatchError, ModelError, OutputNotWritableError
from generator import ranks
from generator.config import CONFIG_NAME, GenerateConfig, fingerprint
from generator.plan import FILTER_STRIDE, ShardPlan, plan_shards
from shards.format import CIFAR10_CLASSES, MANIFEST_NAME, WORK_DIR
from shards.manifest import Manifest, atomic_write_bytes, load_manifest
from shards.writer import (
    STATE_NAME,
    ShardRecord,
    begin,
    load_records,
    records_from_dataset,
    sha256_file,
    write_shard,
)

NUM_CLASSES = len(CIFAR10_CLASSES)


def local_root(cfg: GenerateConfig) -> tuple[Path, str | None]:
    """Where shards are written, and the fsspec URL to upload to (None if local)."""
    if "://" not in cfg.out or cfg.out.startswith("file://"):
        return Path(cfg.out.removeprefix("file://")).expanduser(), None
    digest = hashlib.sha256(cfg.out.encode()).hexdigest()[:16]
    base = Path(cfg.staging) if cfg.staging else Path("~/.cache/cifar5m/staging").expanduser()
    return base / digest, cfg.out


def check_writable(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise OutputNotWritableError(f"output {root} exists and is not a directory")
    parent = root
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"output {root} is not writable ({parent} does not allow it); "
                                     f"choose another --out")


def existing(root: Path) -> tuple[dict[str, Any] | None, dict[str, ShardRecord]]:
    """Fingerprint and shards of what ``root`` already holds, read without writing."""
    fp, records = None, {}
    if (root / MANIFEST_NAME).is_file():
        fp = load_manifest(root).provenance.get("fingerprint")
        records = records_from_dataset(root)
    state = root / WORK_DIR / STATE_NAME
    if state.is_file():
        fp = json.loads(state.read_text())["fingerprint"]
        records.update(load_records(root, check=False))
    return fp, records


def check_existing(root: Path, fp: dict[str, Any], plan: list[ShardPlan]) -> dict[str, ShardRecord]:
    """Finished shards to keep; refuses other settings or a smaller count."""
    old_fp, records = existing(root)
    if old_fp is not None and old_fp != fp:
        changed = sorted(k for k in set(old_fp) | set(fp) if old_fp.get(k) != fp.get(k))
        raise ConfigMismatchError(
            f"{root} holds a dataset made with other settings ({', '.join(changed)} differ: "
            f"{ {k: old_fp.get(k) for k in changed} } there); use the same settings to resume or "
            f"extend it, or another --out")
    sizes = {p.file: p.size for p in plan}
    have = sum(r.info.samples for r in records.values())
    too_big = [f for f, r in records.items() if f not in sizes or r.info.samples > sizes[f]]
    if too_big:
        raise ConfigMismatchError(
            f"{root} already holds {have:,} samples, more than --count {sum(sizes.values()):,} "
            f"plans (e.g. {sorted(too_big)[0]}); datasets only grow: pass --count >= {have:,}")
    # A partial last train shard of a smaller count is regenerated at its new size.
    return {f: r for f, r in records.items() if r.info.samples == sizes[f]}


def drop_damaged(root: Path) -> list[str]:
    """Delete unfinished-run shards whose bytes no longer match their recorded sha256.

    They are regenerated like never-written shards (same noise, same bytes), so a torn
    or corrupted file costs one shard of work instead of a manual clean-up.
    """
    if not (root / WORK_DIR / STATE_NAME).is_file():
        return []
    dropped = []
    for name, rec in load_records(root, check=False).items():
        shard = root / name
        if shard.stat().st_size != rec.info.bytes or sha256_file(shard) != rec.info.sha256:
            shard.unlink()
            rec.part.unlink()
            dropped.append(name)
    return dropped


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


def run(cfg: GenerateConfig, *, progress: bool = True) -> Manifest | None:
    """Generate (or resume, or extend) the dataset ``cfg`` describes; the manifest on rank 0."""
    from generator.session import Session

    rank = ranks.from_env()
    root, url = local_root(cfg)
    session = Session(cfg, rank)  # loads model config + labeler, checks shapes
    check_writable(root)
    fp = fingerprint(cfg, model_sha256=session.model_sha256, labeler_sha256=session.labeler_sha256,
                     dtype=session.dtype_name)
    plan = plan_shards(count=cfg.count, test_count=cfg.test_count, shard_size=cfg.shard_size,
                       stride=FILTER_STRIDE if cfg.filtered else 1)
    keep = check_existing(root, fp, plan)
    if (root / MANIFEST_NAME).is_file() and len(keep) == len(plan) and not (root / WORK_DIR).exists():
        if rank.is_main:
            print(f"{root} already holds these {cfg.count:,} samples; nothing to do")
            if url:
                session.upload(root, url)
        return load_manifest(root) if rank.is_main else None
    ranks.init(rank)
    try:
        if rank.is_main:
            for name in drop_damaged(root):
                print(f"{root / name} does not match its recorded sha256: regenerating it")
            begin(root, fp, extend=True)
            atomic_write_bytes(root / WORK_DIR / CONFIG_NAME, json.dumps(cfg.to_dict(), indent=1).encode())
        ranks.barrier(rank)
        keep = check_existing(root, fp, plan)  # again: rank 0 may have dropped damaged shards
        todo = [p for g, p in enumerate(plan) if rank.owns(g) and p.file not in keep]
        ok = True
        try:
            session.produce(root, todo, progress=progress)
        except BaseException:
            ok = False
            raise
        finally:
            ok = ranks.broadcast_ok(rank, ok)
        if not rank.is_main:
            return None
        return session.finish(root, url, plan, fp)
    finally:
        ranks.close(rank)


def write_in_background(pool: ThreadPoolExecutor, pending: deque[Future], limit: int,
                        root: Path, plan: ShardPlan, samples: list, image_format: str) -> None:
    """Queue a shard write; block while more than ``limit`` are in flight (bounded memory)."""
    pending.append(pool.submit(write_shard, root, plan.split, plan.index, samples,
                               image_format=image_format))
    while len(pending) > limit:
        pending.popleft().result()
