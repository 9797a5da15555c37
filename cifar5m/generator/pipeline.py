"""``cifar5m generate``: check everything, then sample, label and write shards.

Order of work (nothing is written before step 3):

1. every rank checks the config, the model files and the labeler; loads the UNet;
2. rank 0 alone checks the output and any dataset already there (settings must
   match; count may only grow);
3. rank 0 opens the output (``cifar5m.shards.writer.begin``: keeps finished shards after
   checking their sha256; damaged ones are deleted and regenerated) and tells the
   other ranks which shards are kept (before that they read nothing: rank 0 may be
   deleting damaged shards);
4. each rank samples its shards (round-robin) while a thread pool encodes and writes
   finished ones (``write_shard``: PNG/zlib release the GIL, so this overlaps sampling);
5. all ranks report success; if all succeeded, rank 0 writes index, card and (last)
   manifest.

An fsspec URL output (``--out s3://...``) follows the same steps with no local
output directory: each rank uploads its own shards and rank 0 holds a lease on the
prefix (``cifar5m.generator.store``).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from cifar5m.core.atomic import atomic_write_bytes
from cifar5m.core.errors import (
    OutputNotWritableError,
)
from cifar5m.generator import defaults, rendezvous
from cifar5m.generator.config import CONFIG_NAME, GenerateConfig, fingerprint
from cifar5m.generator.generation import Session
from cifar5m.generator.plan import FILTER_STRIDE, ShardPlan, plan_shards
from cifar5m.generator.rendezvous import produce_on_all_ranks, shared_from_main
from cifar5m.generator.resume import fitting, refuse_other_settings
from cifar5m.generator.store import is_url, run_to_store
from cifar5m.shards.format import MANIFEST_NAME, WORK_DIR
from cifar5m.shards.lock import DirectoryLock
from cifar5m.shards.manifest import Manifest, load_manifest
from cifar5m.shards.writer import (
    STATE_NAME,
    ShardRecord,
    begin,
    load_records,
    part_path,
    write_shard,
)


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


def previous_fingerprint(root: Path) -> dict[str, Any] | None:
    """The fingerprint of what ``root`` holds (an unfinished write's, else the finished
    dataset's), read without writing; ``{}`` for a dataset not made by generate."""
    state = root / WORK_DIR / STATE_NAME
    if state.is_file():
        return json.loads(state.read_text())["fingerprint"]
    if (root / MANIFEST_NAME).is_file():
        return load_manifest(root).provenance.get("fingerprint") or {}
    return None


def existing_sizes(root: Path) -> dict[str, int]:
    """Shard sizes (samples) of what ``root`` holds: the manifest's, then the parts of an
    unfinished write (their footers). A part whose shard file is gone does not count: that
    shard is regenerated."""
    sizes = {}
    if (root / MANIFEST_NAME).is_file():
        sizes = {s.file: s.samples for s in load_manifest(root).shards}
    if (root / WORK_DIR / STATE_NAME).is_file():
        sizes.update({name: pq.read_metadata(part).num_rows for name, part in parts(root).items()
                      if (root / name).is_file()})
    return sizes


def check_existing(root: Path, fp: dict[str, Any], plan: list[ShardPlan]) -> dict[str, int]:
    """Finished shards (file -> samples) to keep; refuses other settings or a smaller count."""
    refuse_other_settings(str(root), previous_fingerprint(root), fp)
    return fitting(str(root), existing_sizes(root), plan)


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


def run(cfg: GenerateConfig, *, progress: bool = True, storage_options: dict[str, Any] | None = None,
        break_lease: bool = False) -> Manifest | None:
    """Generate (or resume, or extend) the dataset ``cfg`` describes; the manifest on rank 0.

    ``storage_options`` (fsspec) and ``break_lease`` apply to URL outputs only.
    """

    rank = rendezvous.from_env()
    url = is_url(cfg.out)
    # Extending keeps the split of the local dataset there (one process: under torchrun each
    # node may see another local root, so the ranks could disagree; they take the default).
    previous = None if url or rank.world > 1 else previous_fingerprint(local_root(cfg))
    cfg = defaults.with_test_count(cfg, previous)
    session = Session(cfg, rank)  # loads model config + labeler, checks shapes
    cfg = session.cfg  # with the settings the device chose
    fp = fingerprint(cfg, model_sha256=session.model_sha256, labeler_sha256=session.labeler_sha256,
                     dtype=session.dtype_name)
    plan = plan_shards(count=cfg.count, test_count=cfg.test_count, shard_size=cfg.shard_size,
                       stride=FILTER_STRIDE if cfg.filtered else 1)
    if url:
        rendezvous.init(rank)
        try:
            return run_to_store(cfg, session, rank, fp, plan, progress=progress,
                                storage_options=storage_options, break_lease=break_lease)
        finally:
            rendezvous.close(rank)
    root = local_root(cfg)
    check_writable(root)
    rendezvous.init(rank)
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
        rendezvous.close(rank)


def write_local(root: Path, image_format: str, plan: ShardPlan, samples: list) -> ShardRecord:
    return write_shard(root, plan.split, plan.index, samples, image_format=image_format)
