"""fsspec URL outputs (``--out s3://...``): every rank writes straight to the store.

Nothing is staged on a disk another node must see. While a run is unfinished the
prefix holds:

- ``{split}-{index:06d}.tar``: shards, each uploaded by the rank that made it;
- ``_work/{split}-{index:06d}.parquet``: the shard's index part (its rows, size and
  sha256), uploaded after the shard: a shard without its part is unfinished;
- ``_work/state.json``: the fingerprint of the run, written by rank 0 at the start;
- ``_work/lease.json``: the lease of the job writing (``cifar5m.generator.lease``).

Each object is put whole: on stores whose put is atomic (S3, GCS, Azure, memory) an
object is either absent or complete; elsewhere it is written under a temp name and
moved. Rank 0 finishes by reading the parts back from the store into a private temp
directory, building ``index.parquet``, ``README.md`` and ``generate_config.json``
there, uploading them and ``manifest.json`` last, then removing ``_work/``.

Resume is read from the store: a rerun, with any number of ranks, keeps each shard
whose part exists and whose object has the part's size and sha256 (checked by the
rank that owns the shard in this run), and regenerates the rest.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from cifar5m.core.errors import GenerationError, OutputNotWritableError
from cifar5m.generator import rendezvous
from cifar5m.generator.config import GenerateConfig
from cifar5m.generator.lease import LEASE_NAME, Lease
from cifar5m.generator.plan import ShardPlan
from cifar5m.generator.rendezvous import produce_on_all_ranks, shared_from_main
from cifar5m.generator.resume import fitting, refuse_other_settings
from cifar5m.shards.format import INDEX_NAME, MANIFEST_NAME, WORK_DIR
from cifar5m.shards.manifest import Manifest, read_manifest_text
from cifar5m.shards.shard import (
    ShardInfo,
    ShardRecord,
    build_shard,
    part_bytes,
    part_info,
    part_path,
)
from cifar5m.shards.writer import STATE_NAME, records_from_dataset

# Protocols whose put makes an object appear whole or not at all.
ATOMIC_PUT = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
THREADS = 8  # concurrent small reads (part footers, resume checks)


def is_url(out: str) -> bool:
    return "://" in out and not out.startswith("file://")


class Store:
    """The output prefix ``url`` on its fsspec filesystem."""

    def __init__(self, url: str, *, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        try:
            self.fs, base = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise OutputNotWritableError(f"cannot open --out {url}: {exc}") from None
        self.base = base.rstrip("/")
        protocol = self.fs.protocol
        self.atomic = bool(({protocol} if isinstance(protocol, str) else set(protocol)) & ATOMIC_PUT)

    def path(self, name: str) -> str:
        return f"{self.base}/{name}"

    def put(self, name: str, data: bytes) -> None:
        """Write object ``name`` whole (atomic put, or temp name then move)."""
        if self.atomic:
            self.fs.pipe_file(self.path(name), data)
            return
        tmp = self.path(f"{WORK_DIR}/tmp/{posixpath.basename(name)}.{uuid.uuid4().hex}")
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, self.path(name))

    def cat(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            return None

    def sizes(self, folder: str = "") -> dict[str, int]:
        """Object name -> size of the files directly in ``folder`` (fresh, not cached)."""
        self.fs.invalidate_cache()
        where = self.path(folder) if folder else self.base
        try:
            entries = self.fs.ls(where, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                for e in entries if e.get("type") == "file"}

    def parts(self, *, only: set[str] | None = None) -> dict[str, ShardInfo]:
        """Shard file -> what its part in ``_work/`` says (footers read in parallel)."""
        names = [n for n in self.sizes(WORK_DIR) if n.endswith(".parquet")]
        files = {n: n.removesuffix(".parquet") + ".tar" for n in names}
        if only is not None:
            names = [n for n in names if files[n] in only]

        def read(name: str) -> ShardInfo | None:
            try:
                with self.fs.open(self.path(f"{WORK_DIR}/{name}"), "rb") as f:
                    meta = pq.read_metadata(f)
                info = part_info(meta)
            except FileNotFoundError:
                return None
            except (ValueError, KeyError, TypeError):  # not a part of ours: its shard is redone
                return None
            return info if info.file == files[name] and meta.num_rows == info.samples else None

        with ThreadPoolExecutor(THREADS) as pool:
            infos = list(pool.map(read, names))
        return {i.file: i for i in infos if i is not None}

    def manifest(self) -> Manifest | None:
        data = self.cat(MANIFEST_NAME)
        return None if data is None else read_manifest_text(data, where=f"{self.url}/{MANIFEST_NAME}")

    def state(self) -> dict[str, Any] | None:
        data = self.cat(f"{WORK_DIR}/{STATE_NAME}")
        return None if data is None else json.loads(data)["fingerprint"]

    def lease(self) -> Lease:
        return Lease(self.fs, self.path(f"{WORK_DIR}/{LEASE_NAME}"), where=self.url)


def check_reachable(store: Store) -> None:
    try:
        store.fs.makedirs(store.base, exist_ok=True)
        store.sizes()
    except (OSError, ValueError) as exc:
        raise OutputNotWritableError(f"cannot reach --out {store.url}: {exc}; check the URL, its "
                                     f"credentials and --storage-options") from None


def prepare(store: Store, fp: dict[str, Any], plan: list[ShardPlan]) -> Manifest | None:
    """On rank 0, holding the lease: check what the prefix holds, then open it for this run.

    Returns the manifest when the dataset is already complete (nothing to do).
    """
    manifest, state = store.manifest(), store.state()
    old = state if state is not None else (
        (manifest.provenance.get("fingerprint") or {}) if manifest is not None else None)
    refuse_other_settings(store.url, old, fp)
    finished = {s.file: s.samples for s in manifest.shards} if manifest is not None else {}
    parts = store.parts()  # listed once: the count check and reopening both use it
    have = {**finished, **{f: i.samples for f, i in parts.items()}}
    fitting(store.url, have, plan)  # refuses a smaller count
    if manifest is not None and state is None and len(fitting(store.url, finished, plan)) == len(plan):
        print(f"{store.url} already holds these {sum(p.size for p in plan):,} samples; nothing to do")
        return manifest
    store.put(f"{WORK_DIR}/{STATE_NAME}", json.dumps({"fingerprint": fp}, indent=1).encode())
    if manifest is not None:
        reopen_finished(store, manifest, {p.file: p.size for p in plan}, have=set(parts))
    return None


def reopen_finished(store: Store, manifest: Manifest, sizes: dict[str, int], *, have: set[str]) -> None:
    """Extending: give each finished shard that stays and has no part yet (``have``: the
    shards with one) its part, then take the manifest away (a crash in between redoes this:
    the state says the write is unfinished)."""
    with tempfile.TemporaryDirectory(prefix="cifar5m-extend-") as tmp:
        for name in (MANIFEST_NAME, INDEX_NAME):
            data = store.cat(name)
            if data is None:
                raise GenerationError(f"{store.url}/{name} vanished while extending; re-run")
            Path(tmp, name).write_bytes(data)
        for file, rec in records_from_dataset(tmp).items():
            if sizes.get(file) == rec.info.samples and file not in have:
                store.put(f"{WORK_DIR}/{Path(file).stem}.parquet", part_bytes(rec.info, rec.rows()))
    store.fs.rm_file(store.path(MANIFEST_NAME))


def kept_shards(store: Store, mine: list[ShardPlan], *, progress: bool) -> set[str]:
    """Of this rank's shards, those already in the store with their part's size and sha256."""
    parts = store.parts(only={p.file for p in mine})
    sizes = store.sizes()
    want = {p.file: p.size for p in mine}
    candidates = [i for f, i in parts.items() if want[f] == i.samples and sizes.get(f) == i.bytes]

    def intact(info: ShardInfo) -> bool:
        data = store.cat(info.file)
        return data is not None and len(data) == info.bytes and hashlib.sha256(data).hexdigest() == info.sha256

    with ThreadPoolExecutor(THREADS) as pool:
        good = {i.file for i, ok in zip(candidates, pool.map(intact, candidates), strict=True) if ok}
    if progress and candidates and len(good) < len(candidates):
        bad = sorted({i.file for i in candidates} - good)
        print(f"{len(bad)} shard(s) in {store.url} do not match their recorded sha256 (e.g. {bad[0]}): "
              f"regenerating them")
    return good


def shard_writer(store: Store, image_format: str) -> Callable[[ShardPlan, list], ShardInfo]:
    """Encode a shard in memory, upload it, then upload its part (the shard is then finished)."""
    def write(plan: ShardPlan, samples: list) -> ShardInfo:
        data, info, table = build_shard(plan.split, plan.index, samples, image_format=image_format,
                                        where=f"{store.url}/{plan.file}")
        store.put(info.file, data)
        store.put(f"{WORK_DIR}/{Path(info.file).stem}.parquet", part_bytes(info, table))
        return info
    return write


def finish(store: Store, session: Any, plan: list[ShardPlan], fp: dict[str, Any], lease: Lease,
           *, scratch: str | None) -> Manifest:
    """On rank 0 after all ranks succeeded: index, card, config and manifest from the parts."""
    parts, sizes = store.parts(), store.sizes()
    missing = [p.file for p in plan if p.file not in parts or parts[p.file].samples != p.size
               or sizes.get(p.file) != parts[p.file].bytes]
    if missing:
        raise GenerationError(f"{store.url}: shards {missing[:3]} are missing after all ranks finished; "
                              f"re-run the same command to write them")
    with tempfile.TemporaryDirectory(prefix="cifar5m-finish-", dir=_scratch(scratch)) as tmp:
        root = Path(tmp)
        (root / WORK_DIR).mkdir()

        def fetch(p: ShardPlan) -> ShardRecord:
            path = part_path(root, p.file)
            store.fs.get_file(store.path(f"{WORK_DIR}/{path.name}"), str(path))
            return ShardRecord(parts[p.file], None, path)

        with ThreadPoolExecutor(THREADS) as pool:
            records = {r.info.file: r for r in pool.map(fetch, plan)}
        lease.confirm()
        manifest = session.finish(root, plan, fp, records)
        names = sorted(p.name for p in root.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
        for name in names:
            store.fs.put_file(str(root / name), store.path(name))
        lease.confirm()
        store.put(MANIFEST_NAME, (root / MANIFEST_NAME).read_bytes())
    lease.stop()
    store.fs.rm(store.path(WORK_DIR), recursive=True)  # drops the lease with the parts
    return manifest


def _scratch(scratch: str | None) -> str | None:
    if scratch is None:
        return None
    path = Path(scratch).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def run_to_store(cfg: GenerateConfig, session: Any, rank: rendezvous.Rank, fp: dict[str, Any],
                 plan: list[ShardPlan], *, progress: bool, storage_options: dict[str, Any] | None,
                 break_lease: bool) -> Manifest | None:
    store = Store(cfg.out, storage_options=storage_options)
    lease = store.lease() if rank.is_main else None  # rank 0 holds it for the whole job

    def open_on_main() -> tuple[tuple, Manifest | None]:
        check_reachable(store)
        lease.acquire(break_lease=break_lease)
        return (), prepare(store, fp, plan)

    try:
        done = shared_from_main(rank, open_on_main)[1]
        if done is not None:
            return done if rank.is_main else None
        mine = [p for g, p in enumerate(plan) if rank.owns(g)]
        keep = kept_shards(store, mine, progress=progress)
        todo = [p for p in mine if p.file not in keep]
        produce_on_all_ranks(session, rank, todo, shard_writer(store, cfg.image_format), progress=progress)
        if not rank.is_main:
            return None
        return finish(store, session, plan, fp, lease, scratch=cfg.staging)
    finally:
        if lease is not None:
            lease.release()
