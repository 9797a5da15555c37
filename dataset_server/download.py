"""``cifar5m download``: fetch a dataset repo with huggingface_hub, then check every byte.

The transfer is ``huggingface_hub.snapshot_download`` (so the Hub itself, a mirror or
``cifar5m serve`` all work); it already skips files that are complete locally, so a
re-run after an interruption fetches only what is missing (a file cut off mid-way is
fetched again from its start: huggingface_hub 2.x deletes its partial temp file).
The check then compares every file with ``manifest.json`` (size and sha256): the
client only checks sizes. Verified hashes are remembered by (size, mtime) in
``<dir>/.cache/cifar5m/verified.json``, so a re-run does not re-read 37 GB.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cifar5m.errors import DownloadError, ManifestError
from shards.format import MANIFEST_NAME
from shards.manifest import FileInfo, atomic_write_bytes, load_manifest
from shards.shard import sha256_file

VERIFIED_CACHE = Path(".cache") / "cifar5m" / "verified.json"
# Leftover partial files of a killed huggingface_hub download older than this are removed.
STALE_PARTIAL_S = 60


@dataclass(frozen=True)
class DownloadResult:
    """Where the dataset is and what was checked."""

    path: Path
    files: int
    bytes: int


def _expected(root: Path) -> list[FileInfo]:
    try:
        manifest = load_manifest(root)
    except (OSError, ManifestError) as exc:
        raise DownloadError(f"{root}: cannot read {MANIFEST_NAME} ({exc}); is this a cifar5m dataset?") from exc
    return [FileInfo(s.file, s.bytes, s.sha256) for s in manifest.shards] + list(manifest.files)


def verify_download(root: str | Path, *, remember: bool = True) -> DownloadResult:
    """Check every file ``manifest.json`` lists under ``root``; raise DownloadError naming one.

    With ``remember``, hashes already checked are kept in ``root/.cache/cifar5m`` (not
    done inside the huggingface_hub cache, whose snapshot folders hold repo files only).
    """
    from tqdm import tqdm

    root = Path(root)
    expected = _expected(root)
    cache_path = root / VERIFIED_CACHE
    try:
        cache = json.loads(cache_path.read_text()) if remember else {}
    except (OSError, ValueError):
        cache = {}
    todo: list[tuple[FileInfo, Path, os.stat_result]] = []
    for info in expected:
        path = root / info.file
        try:
            st = path.stat()
        except OSError as exc:
            raise DownloadError(f"{path} is missing ({exc.strerror}); re-run the download to fetch it") from exc
        if st.st_size != info.bytes:
            raise DownloadError(f"{path} has {st.st_size} bytes, the manifest says {info.bytes}; "
                                f"delete it and re-run the download")
        if cache.get(info.file) != [st.st_size, st.st_mtime_ns, info.sha256]:
            todo.append((info, path, st))
    with tqdm(total=sum(i.bytes for i, _, _ in todo), unit="B", unit_scale=True,
              desc="verify sha256", disable=not todo) as progress:
        for info, path, st in todo:
            if sha256_file(path) != info.sha256:
                if remember:
                    cache.pop(info.file, None)
                    _save(cache_path, cache)
                raise DownloadError(f"{path} does not match the sha256 in {MANIFEST_NAME}: delete it "
                                    "and re-run the download (the server's copy may be corrupt: "
                                    "run `cifar5m verify` there)")
            cache[info.file] = [st.st_size, st.st_mtime_ns, info.sha256]
            progress.update(info.bytes)
    if todo and remember:
        _save(cache_path, cache)
    return DownloadResult(root, len(expected) + 1, sum(i.bytes for i in expected))


def _save(path: Path, cache: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(cache).encode())


def remove_stale_partials(local_dir: Path, *, older_than_s: float = STALE_PARTIAL_S) -> int:
    """Delete ``*.incomplete`` temp files a killed download left; return how many."""
    removed = 0
    now = time.time()
    for path in _walk_incomplete(local_dir / ".cache" / "huggingface"):
        try:
            if now - path.stat().st_mtime > older_than_s:
                path.unlink()
                removed += 1
        except OSError:
            continue  # another download may be finishing it
    return removed


def _walk_incomplete(folder: Path) -> Iterable[Path]:
    return folder.rglob("*.incomplete") if folder.is_dir() else []


def _unreachable(exc: BaseException, httpx2) -> str | None:
    """'connection refused' (or the connect error) when ``exc`` comes from not reaching the
    server at all; huggingface_hub wraps it in two lines about the Hub and local snapshots."""
    chain: list[BaseException] = []
    while exc is not None and len(chain) < 20:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused"
    connect = next((e for e in chain if isinstance(e, httpx2.ConnectError)), None)
    return None if connect is None else f"cannot connect ({connect})"


def download(repo_id: str, *, endpoint: str | None = None, revision: str | None = None,
             local_dir: str | Path | None = None, token: str | None = None,
             max_workers: int = 8) -> DownloadResult:
    """Download dataset ``repo_id`` (``org/name``) and verify it against its manifest.

    ``endpoint`` None means huggingface_hub's default (``HF_ENDPOINT`` or the Hub);
    ``local_dir`` None means the huggingface_hub cache.
    """
    import httpx2
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = endpoint or "the default endpoint (HF_ENDPOINT or huggingface.co)"
    if local_dir is not None:
        remove_stale_partials(Path(local_dir))
    try:
        path = snapshot_download(repo_id, repo_type="dataset", revision=revision, endpoint=endpoint,
                                 local_dir=local_dir, token=token, max_workers=max_workers)
    except GatedRepoError as exc:
        raise DownloadError(f"dataset {repo_id} at {where} is gated: pass --token with access") from exc
    except RepositoryNotFoundError as exc:
        raise DownloadError(f"dataset {repo_id} not found at {where}, or it is private: check the name "
                            "and pass --token") from exc
    except RevisionNotFoundError as exc:
        raise DownloadError(f"dataset {repo_id} has no revision {revision!r} at {where}: use 'main' "
                            "or the current commit sha") from exc
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, httpx2.HTTPError) as exc:
        if (unreachable := _unreachable(exc, httpx2)) is not None:
            raise DownloadError(f"{unreachable} at {endpoint or where}: is the server running and "
                                "--endpoint right?") from exc
        raise DownloadError(f"downloading {repo_id} from {where} failed ({exc}); re-run the same "
                            "command to resume (complete files are kept)") from exc
    return verify_download(path, remember=local_dir is not None)
