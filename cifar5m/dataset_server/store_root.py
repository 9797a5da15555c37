"""Datasets on an object store (any fsspec URL: ``s3://bucket/prefix``, ``gs://...``).

The layout is the one of a local root: ``<prefix>/<org>/<name>/manifest.json`` is
``org/name``, ``<prefix>/<name>/manifest.json`` is ``local/<name>`` and a prefix that is a
dataset is ``local/<its last part>``; the datasets are found once, when the server starts.

A scan lists the dataset's folder (one LIST request per 1000 objects) and keeps what it
saw of each object: size and version (the store's ETag). ``manifest.json`` and
``README.md`` are read from the store and kept in memory (they are answered from there);
they, the card's front matter and the manifest are read again only when their version
changes. The sha256 of every other object (shards, ``index.parquet``) is the one of its
bytes: read and hashed once per version (the supervisor does it at start-up and hands
the hashes to the workers), so a manifest replaced before its shards never lends its
sha256s to the old bytes. An object whose version changed while it was hashed is left
out of that scan.

Files are sent by the store: a file request is answered with a redirect to a URL signed
by the file system (``fs.sign``) once a fresh look at the object (HEAD) shows the
version the commit was made from; otherwise the dataset is scanned again, and a client
that pinned the old commit gets ``RevisionNotFound``, never new bytes under an old
commit. On a version-aware S3 file system (``{"version_aware": true}``, a bucket with
versioning) the URL names the object version itself.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec

from cifar5m.core.errors import ServerConfigError, StoreError
from cifar5m.dataset_server.hashes import HashCache, digest
from cifar5m.dataset_server.repo import (
    SINGLE_ORG,
    Library,
    RepoFile,
    RepoState,
    commit_state,
    git_blob_sha1,
    is_lfs,
    lfs_pointer,
    served_name,
    valid_name,
)
from cifar5m.shards.format import MANIFEST_NAME
from cifar5m.shards.manifest import Manifest

HASH_THREADS = 8  # objects read at once while hashing


def is_store_url(root: str | os.PathLike) -> bool:
    """Whether a serve root names an object store rather than a folder of this machine."""
    return isinstance(root, str) and "://" in root and not root.startswith("file://")


def open_library(root: str | os.PathLike, storage_options: dict | None = None,
                 hashes: HashCache | None = None) -> Library | StoreLibrary:
    """The datasets of a serve root: a folder of this machine, or an object-store URL."""
    if is_store_url(root):
        return StoreLibrary(str(root), storage_options, hashes)
    return Library(Path(root), hashes)


def _version(info: dict) -> str:
    """What names an object's bytes in a listing or HEAD: the ETag (S3, GCS), else its date."""
    for key in ("ETag", "etag", "generation", "mtime", "LastModified", "last_modified"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _mtime_ns(info: dict) -> int:
    when = info.get("LastModified") or info.get("updated") or info.get("mtime") or 0
    if isinstance(when, str):
        when = dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
    if isinstance(when, dt.datetime):
        return int(when.timestamp() * 1e9)
    return int(float(when) * 1e9)


def _store_call(what: str, call, *args, **kwargs):
    """``call(*args, **kwargs)``; a failure other than a missing object is a StoreError."""
    try:
        return call(*args, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as exc:  # botocore, aiohttp, gcsfs: each has its own
        raise StoreError(f"{what} failed: {exc}") from exc


class StoreRepo:
    """The dataset folder ``dir`` (a path of ``library.fs``) as a Hub repository."""

    def __init__(self, library: StoreLibrary, directory: str, repo_id: str) -> None:
        self.library, self.dir, self.repo_id = library, directory, repo_id
        self._state: RepoState | None = None
        self._bodies: dict[tuple[str, str], bytes] = {}  # (name, version) -> bytes of small files
        self._checked_at = -math.inf
        self._lock = threading.Lock()

    def cached(self, max_age: float) -> RepoState | None:
        """The last scan if it is at most ``max_age`` seconds old."""
        state = self._state
        return state if state is not None and time.monotonic() - self._checked_at <= max_age else None

    def revalidated(self) -> None:
        """Only a listing tells whether the objects changed: never without a scan."""
        return None

    def body(self, f: RepoFile) -> bytes | None:
        """The bytes of small file ``f`` (None: no longer the version the last scan read)."""
        return self._bodies.get((f.name, f.version))

    def scan(self) -> RepoState:
        """List the folder, read what changed, and return the state (blocking: a thread's job).
        FileNotFoundError when the folder has no manifest any more."""
        with self._lock:
            listing = self._listing()
            prev = self._state.files if self._state is not None else {}
            bodies: dict[tuple[str, str], bytes] = {}  # of this scan's small files
            top = self._entry(MANIFEST_NAME, listing[MANIFEST_NAME], prev, bodies)
            manifest = self._manifest(top, bodies)
            files = {MANIFEST_NAME: top, **self._listed(manifest, listing, prev, bodies)}
            self._bodies = bodies
            self._state = commit_state(self.repo_id, files, manifest, self._state,
                                       lambda f: bodies.get((f.name, f.version), b"").decode("utf-8"),
                                       fs=self.library.fs)
            self._checked_at = time.monotonic()
            return self._state

    def _listing(self) -> dict[str, dict]:
        """What one listing of the folder says of each object, by file name."""
        fs = self.library.fs
        _store_call(f"listing {self.dir}", fs.invalidate_cache, self.dir)
        infos = _store_call(f"listing {self.dir}", fs.ls, self.dir, detail=True)
        listing = {i["name"].rsplit("/", 1)[-1]: i for i in infos if i.get("type") == "file"}
        if MANIFEST_NAME not in listing:
            raise FileNotFoundError(f"{self.repo_id} has no {MANIFEST_NAME} any more")
        return listing

    def _listed(self, manifest: Manifest, listing: dict[str, dict], prev: dict[str, RepoFile],
                bodies: dict[tuple[str, str], bytes]) -> dict[str, RepoFile]:
        """The entries of the files the manifest lists that are there, new objects hashed (in
        threads); one that changed while it was hashed is left out."""
        listed = {s.file for s in manifest.shards} | {f.file for f in manifest.files}
        names = sorted((n for n in listed & listing.keys() if served_name(n)), key=lambda n: (n.endswith(".tar"), n))
        files = {name: self._entry(name, listing[name], prev, bodies) for name in names}
        todo = [f for f in files.values() if not f.sha256]
        if todo:
            with ThreadPoolExecutor(min(HASH_THREADS, len(todo))) as pool:
                for entry in pool.map(self._hash, todo):
                    if entry.sha256:
                        files[entry.name] = entry
                    else:
                        del files[entry.name]
        return files

    def _entry(self, name: str, info: dict, prev: dict[str, RepoFile],
               bodies: dict[tuple[str, str], bytes]) -> RepoFile:
        """The entry of object ``name`` (sha256 "" when it is still to be hashed)."""
        path, size, version = f"{self.dir}/{name}", int(info["size"]), _version(info)
        known = prev.get(name)
        small = not is_lfs(name, size)
        if known is not None and (known.size, known.version) == (size, version) and \
                (not small or (name, version) in self._bodies):
            if small:
                bodies[name, version] = self._bodies[name, version]
            return known
        if small:
            data = bodies[name, version] = _store_call(f"reading {path}", self.library.fs.cat_file, path)
            sha, oid = digest(io.BytesIO(data), len(data), git=True)
            return RepoFile(name, path, len(data), _mtime_ns(info), 0, sha, oid or "", False, version)
        sums = self.library.hashes.get((path, size, version, 0))
        sha = sums[0] if sums is not None else ""
        oid = git_blob_sha1(lfs_pointer(sha, size)) if sha else ""
        return RepoFile(name, path, size, _mtime_ns(info), 0, sha, oid, True, version)

    def _manifest(self, top: RepoFile, bodies: dict[tuple[str, str], bytes]) -> Manifest:
        state = self._state
        if state is not None and state.files.get(MANIFEST_NAME) is top:
            return state.manifest
        return Manifest.from_json(bodies[MANIFEST_NAME, top.version].decode("utf-8"),
                                  where=f"{self.repo_id}/{MANIFEST_NAME}")

    def _hash(self, f: RepoFile) -> RepoFile:
        fs = self.library.fs
        with _store_call(f"reading {f.path}", fs.open, f.path, "rb") as stream:
            sha, _ = _store_call(f"reading {f.path}", digest, stream, f.size, git=False)
        if not self._same(f):
            return RepoFile(f.name, f.path, f.size, f.mtime_ns, 0, "", "", True, f.version)
        self.library.hashes.put((f.path, f.size, f.version, 0), (sha, None))
        return RepoFile(f.name, f.path, f.size, f.mtime_ns, 0, sha, git_blob_sha1(lfs_pointer(sha, f.size)),
                        True, f.version)

    def _same(self, f: RepoFile) -> dict | None:
        """The object's info (a HEAD, not a cached listing) if it is still ``f``'s version."""
        fs = self.library.fs
        try:
            _store_call(f"looking up {f.path}", fs.invalidate_cache, f.path)
            info = _store_call(f"looking up {f.path}", fs.info, f.path)
        except FileNotFoundError:
            return None
        return info if (int(info.get("size", -1)), _version(info)) == (f.size, f.version) else None

    def signed_url(self, f: RepoFile, expiry_s: int) -> str | None:
        """A URL of ``f``'s bytes for ``expiry_s`` seconds, or None if the object is no longer
        the version the commit was made from (blocking: a thread's job)."""
        info = self._same(f)
        if info is None:
            return None
        fs, path = self.library.fs, f.path
        if getattr(fs, "version_aware", False) and info.get("VersionId"):
            path += f"?versionId={info['VersionId']}"
        return _store_call(f"signing {f.path}", fs.sign, path, expiration=expiry_s)


class StoreLibrary:
    """Every dataset under an object-store URL, looked up by ``org/name`` (module doc)."""

    def __init__(self, url: str, storage_options: dict | None = None, hashes: HashCache | None = None) -> None:
        self.url = url.rstrip("/")
        options = dict(storage_options or {})
        if self.url.startswith(("s3://", "s3a://")):
            # botocore may sign with SigV2, which S3 buckets made since 2020 refuse
            options["config_kwargs"] = {"signature_version": "s3v4", **options.get("config_kwargs", {})}
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as exc:
            raise ServerConfigError(f"cannot serve {self.url}: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise ServerConfigError(f"cannot serve {self.url}: {exc}; check the URL and --storage-options") from exc
        self.base = self.base.rstrip("/")
        self.hashes = hashes or HashCache()
        self._repos = {repo.repo_id: repo for repo in self._found()}

    def _found(self) -> list[StoreRepo]:
        """The datasets under the prefix: one listing of it (and below) at start."""
        try:
            paths = _store_call(f"listing {self.url}", self.fs.find, self.base)
        except (StoreError, OSError) as exc:
            raise ServerConfigError(f"cannot list {self.url}: {exc}; check the URL, the credentials "
                                    "and --storage-options") from exc
        flat, nested = [], []
        for path in paths:
            parts = path[len(self.base):].strip("/").split("/")
            if parts[-1] != MANIFEST_NAME or len(parts) > 3:
                continue
            if len(parts) == 1:  # the prefix is one dataset
                return [StoreRepo(self, self.base, f"{SINGLE_ORG}/{self.base.rsplit('/', 1)[-1]}")]
            org, name = ([SINGLE_ORG, *parts[:1]] if len(parts) == 2 else parts[:2])
            if valid_name(org) and valid_name(name):
                (flat if len(parts) == 2 else nested).append(StoreRepo(self, path.rsplit("/", 1)[0], f"{org}/{name}"))
        found: dict[str, StoreRepo] = {}
        for repo in flat + nested:  # <prefix>/<name> takes local/<name> from <prefix>/local/<name>
            found.setdefault(repo.repo_id, repo)
        return sorted(found.values(), key=lambda r: r.repo_id)

    def get(self, org: str, name: str, *, max_age: float = 0.0) -> StoreRepo | None:
        return self._repos.get(f"{org}/{name}")

    def repos(self) -> list[StoreRepo]:
        return list(self._repos.values())

    def scan_all(self) -> Iterator[tuple[str, RepoState | Exception]]:
        for repo in self.repos():
            try:
                yield repo.repo_id, repo.scan()
            except (OSError, ValueError) as exc:
                yield repo.repo_id, exc

    def check_signing(self) -> None:
        """Raise ServerConfigError if this file system cannot make signed URLs."""
        try:
            self.fs.sign(f"{self.base}/{MANIFEST_NAME}", expiration=60)
        except NotImplementedError:
            raise ServerConfigError(
                f"cannot serve {self.url}: its file system ({type(self.fs).__name__}) cannot make "
                "signed URLs; serve a local folder, or an s3://, gs:// or az:// URL") from None
