"""Byte-range reads of dataset files: local (pread, mmap), plain HTTP(S), any fsspec URL.

A reader asks for many ``[start, end)`` ranges of one shard at once; ranges closer
than ``GAP`` are merged into one request (a PNG sample is ~1.5-4 KB plus 1.5 KB of tar
headers, so a 256-sample block is one ~1 MB request instead of 256). Sources return
what the file holds: a range past the end comes back short, and the caller turns that
into a ``CorruptShardError`` naming the sample and offset.

HTTP(S) is ``cifar5m.shards.http_source.HttpSource``; remote reads retry faults on the
way (``cifar5m.shards.connections``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from cifar5m.core.errors import DownloadError, ShardNotFoundError
from cifar5m.shards import connections
from cifar5m.shards.format import MANIFEST_NAME
from cifar5m.shards.http_source import HttpSource
from cifar5m.shards.manifest import safe_path
from cifar5m.shards.source_base import GAP as GAP  # re-exported: the readers' names
from cifar5m.shards.source_base import Source as Source
from cifar5m.shards.source_base import coalesce as coalesce


class LocalSource(Source):
    """Files on a local disk: whole plan blocks by ``os.pread`` into the caller's buffers,
    everything else through a memory map (the page cache is the cache).

    Maps are ``madvise(MADV_RANDOM)``: with the default read-around a fault reads up to
    ``read_ahead_kb`` (8 MB on a common VM disk) around the page, and scattered reads of
    a large split then cost several times their bytes (measured: 4.8-5x for random
    1.3 MB blocks; 1.0x with MADV_RANDOM; 1.1x and 4-5x faster with ``os.pread``).
    Whole-file reads ask for the whole file at once (``MADV_WILLNEED``) instead.
    """

    local = True

    def __init__(self, root: str | os.PathLike, *, keep: int = 64) -> None:
        self.url = str(root)
        self.root = Path(root)
        self.keep = keep
        self._maps: OrderedDict[str, memoryview] = OrderedDict()
        self._mmaps: dict[str, mmap.mmap] = {}
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()  # guards _fds and reads through them (a lookahead thread)
        self._pid = os.getpid()

    def __getstate__(self) -> dict:  # maps and descriptors are per process
        state = {k: v for k, v in self.__dict__.items() if k != "_lock"}
        return {**state, "_maps": OrderedDict(), "_mmaps": {}, "_fds": OrderedDict()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock, self._pid = threading.Lock(), os.getpid()

    def _path(self, file: str) -> Path:
        """Where ``file`` (a name from the manifest) is: inside the folder, or a ManifestError."""
        return safe_path(self.root, file, where=str(self.root / MANIFEST_NAME))

    def _missing(self, path: Path) -> ShardNotFoundError:
        return ShardNotFoundError(
            f"{path} is missing; the manifest lists it (re-download or re-create the dataset)")

    def _map(self, file: str) -> memoryview:
        view = self._maps.get(file)
        if view is None:
            path = self._path(file)
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            except FileNotFoundError:
                raise self._missing(path) from None
            if size and hasattr(mmap, "MADV_RANDOM"):
                data.madvise(mmap.MADV_RANDOM)
                self._mmaps[file] = data
            view = memoryview(data)
            self._maps[file] = view
            while len(self._maps) > self.keep:
                self._mmaps.pop(self._maps.popitem(last=False)[0], None)
        self._maps.move_to_end(file)
        return view

    def _close_fds(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:  # descriptors are not closed by the GC (maps close themselves)
        if getattr(self, "_pid", None) == os.getpid() and hasattr(self, "_fds"):
            self._close_fds()

    def _fd(self, file: str) -> int:
        """Under the lock: an open descriptor of ``file`` (the last ``keep`` stay open)."""
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = self._fds[file] = os.open(self._path(file), os.O_RDONLY)
            except FileNotFoundError:
                raise self._missing(self.root / file) from None
            while len(self._fds) > self.keep:
                os.close(self._fds.popitem(last=False)[1])
        self._fds.move_to_end(file)
        return fd

    def _pread_into(self, file: str, start: int, dest: memoryview) -> int:
        """Bytes of ``file`` from ``start`` into ``dest`` until it is full or the file ends."""
        if self._pid != os.getpid():  # a forked worker: the lock may have been held at fork
            self._close_fds()  # this process's copies of the parent's descriptors
            self._lock, self._fds, self._pid = threading.Lock(), OrderedDict(), os.getpid()
        with self._lock:  # a descriptor is never closed while a read uses it
            fd, got = self._fd(file), 0
            while got < len(dest):
                n = os.preadv(fd, [dest[got:]], start + got)
                if n == 0:  # end of file: a truncated shard, reported by the caller
                    break
                got += n
            return got

    def fetch(self, requests: Sequence[tuple[str, int, int]]) -> list[memoryview]:
        return [self._map(file)[a:b] for file, a, b in requests]

    def fetch_into(self, requests: Sequence[tuple[str, int, int]],
                   outs: Sequence[memoryview | None]) -> list[memoryview]:
        """Each range read by ``os.preadv`` straight into its ``out`` (or a new buffer where
        none fits): one read of exactly its bytes, short where the file ends early."""
        results = []
        for (file, a, b), out in zip(requests, outs, strict=True):
            dest = out[: b - a] if out is not None and len(out) >= b - a else memoryview(bytearray(b - a))
            results.append(dest[: self._pread_into(file, a, dest)])
        return results

    def read_file(self, file: str) -> memoryview:
        view = self._map(file)
        self.will_read_whole(file)
        return view

    def read_whole(self, file: str) -> bytes:
        with self.open_file(file) as f:
            return f.read()

    def open_file(self, file: str) -> BinaryIO:
        """``file`` opened for reading (a large file read in pieces, never mapped whole)."""
        try:
            return open(self._path(file), "rb")
        except FileNotFoundError:
            raise self._missing(self.root / file) from None

    def will_read_whole(self, file: str) -> None:
        """Start reading all of ``file`` in large requests (a whole-shard read or check)."""
        data = self._mmaps.get(file) if file in self._maps else None
        if data is not None and hasattr(mmap, "MADV_WILLNEED"):
            data.madvise(mmap.MADV_WILLNEED)

    def will_read(self, file: str, offsets: np.ndarray, sizes: np.ndarray) -> None:
        """Start reading these ranges of a mapped ``file`` (``MADV_WILLNEED`` each, merged
        where pages touch): the disk gets them all at once instead of one 4 KB fault at a
        time, which MADV_RANDOM would otherwise make a scattered gather wait for."""
        data = self._mmaps.get(file) if file in self._maps else None
        if data is None or not len(offsets) or not hasattr(mmap, "MADV_WILLNEED"):
            return
        page = mmap.PAGESIZE
        order = np.argsort(offsets, kind="stable")
        starts = offsets[order] // page * page
        ends = np.minimum(offsets[order] + sizes[order], len(data))
        cuts = np.flatnonzero(starts[1:] > np.maximum.accumulate(ends)[:-1]) + 1
        for a, b in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(starts)].tolist(), strict=True):
            start, end = int(starts[a]), int(ends[a:b].max())
            if end > start:
                data.madvise(mmap.MADV_WILLNEED, start, end - start)

    def array(self, file: str) -> np.ndarray:
        """The mapped file as a read-only uint8 array (no copy)."""
        return np.frombuffer(self._map(file), np.uint8)


class FsspecSource(Source):
    """Any fsspec URL (``s3://``, ``gs://``, ...): merged ranges through ``cat_ranges``."""

    def __init__(self, url: str, *, storage_options: dict | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self._pid = -1

    def __getstate__(self) -> dict:
        return {"url": self.url, "storage_options": self.storage_options, "_pid": -1}

    def _fs(self):
        if self._pid != os.getpid():  # async filesystems hold an event loop: one per process
            self.fs, self.path = fsspec.core.url_to_fs(self.url, skip_instance_cache=True,
                                                       **self.storage_options)
            self._pid = os.getpid()
        return self.fs

    def _get_many(self, jobs: list[tuple[str, int, int]]) -> list[bytes]:
        """The jobs' bytes; ranges that failed (after the filesystem's own retries) are asked
        for again with backoff, ``connections.RETRIES`` times, then named in one error."""
        fs, out, todo = self._fs(), [b""] * len(jobs), list(range(len(jobs)))
        for attempt in range(connections.RETRIES + 1):
            if attempt:
                time.sleep(min(connections.MAX_BACKOFF, connections.BACKOFF * 2 ** (attempt - 1)))
            results = fs.cat_ranges([f"{self.path}/{jobs[i][0]}" for i in todo], [jobs[i][1] for i in todo],
                                    [jobs[i][2] for i in todo], on_error="return")
            failed = []
            for i, result in zip(todo, results, strict=True):
                if isinstance(result, FileNotFoundError):
                    raise ShardNotFoundError(f"{self.url}/{jobs[i][0]} is missing; the manifest lists it")
                if isinstance(result, Exception) and not ("InvalidRange" in repr(result) or "416" in str(result)):
                    failed.append((i, result))
                else:  # a range past the end is empty: the caller reports a truncated shard
                    out[i] = b"" if isinstance(result, Exception) else result
            if not failed:
                return out
            todo = [i for i, _ in failed]
        (file, a, b), exc = jobs[failed[0][0]], failed[0][1]
        raise DownloadError(f"reading {self.url}/{file} (bytes {a}-{b - 1}) failed after "
                            f"{connections.RETRIES + 1} tries: {exc!r}")

    def read_file(self, file: str) -> bytes:
        try:
            return self._fs().cat_file(f"{self.path}/{file}")
        except FileNotFoundError:
            raise ShardNotFoundError(f"{self.url}/{file} is missing; the manifest lists it") from None


def open_source(url: str, *, storage_options: dict | None = None) -> Source:
    """The right source for a local path, an http(s) URL or another fsspec URL."""
    if url.startswith(("http://", "https://")):
        return HttpSource(url, headers=(storage_options or {}).get("headers"))
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        return LocalSource(path)
    return FsspecSource(url, storage_options=storage_options)
