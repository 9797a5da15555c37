"""sha256 (and git blob ids) of served files, each file version read once.

A version is named by a key of four values: (path, size, mtime_ns, inode) for a file on
this machine's disk, (path, size, the store's ETag, 0) for an object on a store. The
supervisor of ``cifar5m serve`` hashes at start-up and hands the cache to every worker
through a file (``save`` / ``load``), so no worker reads the same bytes again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import BinaryIO

from cifar5m.core.atomic import atomic_write_bytes

_CHUNK = 4 * 1024 * 1024


def digest(f: BinaryIO, size: int, *, git: bool) -> tuple[str, str | None]:
    """sha256 of what ``f`` holds (``size`` bytes), and its git blob id when ``git``."""
    sha = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False) if git else None
    while chunk := f.read(_CHUNK):
        sha.update(chunk)
        if blob is not None:
            blob.update(chunk)
    return sha.hexdigest(), blob.hexdigest() if blob is not None else None


class HashCache:
    """sha256 (and git id of small files) by file version (module doc); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sums: dict[tuple, tuple[str, str | None]] = {}

    @staticmethod
    def key(path: str, st: os.stat_result) -> tuple:
        return (path, st.st_size, st.st_mtime_ns, st.st_ino)

    def get(self, key: tuple) -> tuple[str, str | None] | None:
        with self._lock:
            return self._sums.get(key)

    def put(self, key: tuple, sums: tuple[str, str | None]) -> None:
        with self._lock:
            self._sums[key] = sums

    def hash_file(self, path: str, st: os.stat_result, *, git: bool) -> tuple[str, str | None]:
        """sha256 (and git blob id when ``git``) of ``path``, from the cache or read once."""
        key = self.key(path, st)
        cached = self.get(key)
        if cached is not None and (cached[1] is not None or not git):
            return cached
        with open(path, "rb") as f:
            sums = digest(f, st.st_size, git=git)
        self.put(key, sums)
        return sums

    def save(self, path: Path) -> None:
        with self._lock:
            rows = [[*k, *v] for k, v in self._sums.items()]
        atomic_write_bytes(Path(path), json.dumps(rows).encode())

    def load(self, path: Path) -> None:
        try:
            rows = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return  # a missing or broken cache only costs re-hashing
        with self._lock:
            for p, size, version, ino, sha, oid in rows:
                self._sums[(p, size, version, ino)] = (sha, oid)
