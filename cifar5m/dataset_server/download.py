"""``cifar5m download``: fetch a dataset repo with huggingface_hub, then check every byte.

The transfer is ``huggingface_hub.hf_hub_download``, file by file (so the Hub itself, a
mirror or ``cifar5m serve`` all work), each stopped once the server sends more bytes than
the manifest lists for it (the manifest itself: ``MAX_MANIFEST_BYTES``). Every name the
manifest lists is a plain file name inside the output (``shards.manifest.safe_path``):
anything else is refused before a byte is written.

With ``--local-dir`` nothing the server sends replaces a file before it is checked: the manifest is fetched first into a staging folder
(``<dir>/.cache/cifar5m/incoming``); files already in ``<dir>`` that match it (size and
sha256) are kept and not fetched again; the others are fetched into staging
(huggingface_hub skips what is complete there, so a re-run after an interruption
fetches only what is missing; a file cut off mid-way is fetched again from its start),
checked against the manifest's sha256, and only then renamed into place, the manifest
last. A file whose bytes do not match is an error naming the server's copy; the local
copy, if any, stays as it was. The folder is locked while a download writes it
(``cifar5m.shards.lock``). Verified hashes are remembered by (size, mtime) in
``<dir>/.cache/cifar5m/verified.json``, so a re-run does not re-read 37 GB.

Without ``--local-dir`` the files go to the huggingface_hub cache, which stores each
version of a file under its own content hash (a bad server copy is a new blob, not an
overwrite of the good one) and is checked after the transfer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cifar5m.core.atomic import atomic_write_bytes
from cifar5m.core.errors import DownloadError, ManifestError
from cifar5m.dataset_server.hub_fetch import Fetch
from cifar5m.shards.format import MANIFEST_NAME
from cifar5m.shards.lock import DirectoryLock
from cifar5m.shards.manifest import FileInfo, load_manifest, safe_path
from cifar5m.shards.shard import sha256_file

VERIFIED_CACHE = Path(".cache") / "cifar5m" / "verified.json"
MAX_MANIFEST_BYTES = 64 << 20  # a manifest of 100,000 shards is ~25 MB
STAGING = Path(".cache") / "cifar5m" / "incoming"
STAGING_OWNER = ".repo"  # in STAGING: the repo id its files belong to


@dataclass(frozen=True)
class DownloadResult:
    """Where the dataset is and what was checked."""

    path: Path
    files: int
    bytes: int


def _listed(folder: Path, where: str) -> list[FileInfo]:
    """Every file the manifest in ``folder`` lists (``where``: how to name it in an error);
    each a plain name (``Manifest.from_json`` checks them)."""
    try:
        manifest = load_manifest(folder)
    except ManifestError as exc:  # a bad entry, a newer format (says to upgrade cifar5m), ...
        raise DownloadError(str(exc).replace(str(folder / MANIFEST_NAME), where)) from None
    except OSError as exc:
        raise DownloadError(f"{where}: cannot read it ({exc}); is this a cifar5m dataset?") from exc
    return [FileInfo(s.file, s.bytes, s.sha256) for s in manifest.shards] + list(manifest.files)


def verify_download(root: str | Path, *, remember: bool = True) -> DownloadResult:
    """Check every file ``manifest.json`` lists under ``root``; raise DownloadError naming one.

    With ``remember``, hashes already checked are kept in ``root/.cache/cifar5m`` (not
    done inside the huggingface_hub cache, whose snapshot folders hold repo files only).
    """
    from tqdm import tqdm

    root = Path(root)
    expected = _listed(root, str(root / MANIFEST_NAME))
    cache_path = root / VERIFIED_CACHE
    cache = _load(cache_path) if remember else {}
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
        if cache.get(info.file) != _stamp(st, info):
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
            cache[info.file] = _stamp(st, info)
            progress.update(info.bytes)
    if todo and remember:
        _save(cache_path, cache)
    return DownloadResult(root, len(expected) + 1, sum(i.bytes for i in expected))


def _stamp(st: os.stat_result, info: FileInfo) -> list:
    """What the verified-hashes cache keeps of a file whose bytes matched ``info``."""
    return [st.st_size, st.st_mtime_ns, info.sha256]


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save(path: Path, cache: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(cache).encode())


def download(repo_id: str, *, endpoint: str | None = None, revision: str | None = None,
             local_dir: str | Path | None = None, token: str | None = None,
             max_workers: int = 8) -> DownloadResult:
    """Download dataset ``repo_id`` (``org/name``) and verify it against its manifest.

    ``endpoint`` None means huggingface_hub's default (``HF_ENDPOINT`` or the Hub);
    ``local_dir`` None means the huggingface_hub cache.
    """
    org, _, name = repo_id.partition("/")
    if not org or not name or "/" in name:  # the Hub would answer a 404 about its API URL
        raise DownloadError(f"{repo_id!r} is not a dataset id: use <org>/<name>, e.g. local/cifar10")
    fetch = Fetch(repo_id, endpoint=endpoint, revision=revision, token=token, max_workers=max_workers)
    if local_dir is None:
        folder = fetch(None, {MANIFEST_NAME: MAX_MANIFEST_BYTES})
        fetch(None, {info.file: info.bytes for info in _listed(folder, fetch.url(MANIFEST_NAME))})
        return verify_download(folder, remember=False)
    root = Path(local_dir)
    with DirectoryLock(root, what="downloaded into"):
        # The partial files of a killed download: ours (we hold the lock), fetched again whole.
        for partial in (root / STAGING / ".cache" / "huggingface").rglob("*.incomplete"):
            with contextlib.suppress(OSError):  # not a file, not ours to delete: left alone
                partial.unlink()
        return _download_checked(fetch, root)


def _download_checked(fetch: Fetch, root: Path) -> DownloadResult:
    """Fetch what ``root`` lacks into staging, check it, then move it in (manifest last)."""
    staging = root / STAGING
    owner = staging / STAGING_OWNER
    if staging.exists() and (not owner.is_file() or owner.read_text() != fetch.repo_id):
        # another repo's staging: nothing to resume, and huggingface_hub hands back a file
        # local_dir holds when the repo asked for cannot be looked up (not found, private,
        # server down): its files were then "verified" under the wrong name
        shutil.rmtree(staging)
    fetch(staging, {MANIFEST_NAME: MAX_MANIFEST_BYTES})
    owner.write_text(fetch.repo_id)
    expected = _listed(staging, fetch.url(MANIFEST_NAME))
    for info in expected:  # nothing written through a symlink leading out of either folder
        safe_path(root, info.file, where=str(root))
        safe_path(staging, info.file, where=str(staging))
    cache_path = root / VERIFIED_CACHE
    cache = _load(cache_path)
    need = [info for info in expected if not _matches(root / info.file, info, cache)]
    if need:
        fetch(staging, {info.file: info.bytes for info in need})
    for info in need:  # every new byte is checked before it replaces anything
        path = staging / info.file
        if not _matches(path, info, {}):  # always hashed: nothing is remembered of staging
            path.unlink(missing_ok=True)
            kept = f"your copy {root / info.file} was left as it was" if (root / info.file).exists() \
                else "nothing was written in its place"
            raise DownloadError(
                f"{fetch.url(info.file)} does not match the sha256 in {MANIFEST_NAME}: the server's "
                f"copy is corrupt ({kept}); ask whoever runs the server to run `cifar5m verify` "
                f"there, then re-run the download")
    for info in need:
        os.replace(staging / info.file, root / info.file)
        cache[info.file] = _stamp((root / info.file).stat(), info)
    _save(cache_path, cache)  # also the hashes _matches just took: verify_download reuses them
    atomic_write_bytes(root / MANIFEST_NAME, (staging / MANIFEST_NAME).read_bytes())  # last
    return verify_download(root)


def _matches(path: Path, info: FileInfo, cache: dict) -> bool:
    """Whether ``path`` is complete and holds ``info``'s bytes (remembered, else hashed)."""
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != info.bytes:
        return False
    if cache.get(info.file) != _stamp(st, info):
        if sha256_file(path) != info.sha256:
            return False
        cache[info.file] = _stamp(st, info)
    return True
