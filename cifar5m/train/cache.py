"""A local cache of decoded shards, capped in size, shared by ranks and workers.

Each shard becomes one raw file of ``(samples, 3, 32, 32)`` uint8 (NCHW, the layout
batches are delivered in, so a batch is one row gather with no transpose), named by
the shard's sha256 so two datasets never collide and a changed shard is never served
stale. Files are memory-mapped: every process on the machine shares the page cache.
A per-shard ``flock`` makes the first process decode while the others wait, and the
least recently used files are deleted once the total passes ``cap_bytes``.
Lock files are removed when their decode is done; a read-only cache (a shared,
pre-filled directory) is used as it is: hits are served, misses decoded and not kept.
Each file ends with the XXH3-64 digest of its pixels, checked whenever a process maps
the file: a cache file damaged on disk is deleted and decoded again from the (checked)
shard, never served.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from cifar5m.core.atomic import atomic_write_bytes
from cifar5m.shards import checksum
from cifar5m.shards.format import IMAGE_BYTES as SAMPLE_BYTES

log = logging.getLogger("cifar5m.stream")
SUFFIX = ".chw.u8"
DIGEST_BYTES = 8  # the XXH3-64 of the pixels, after them
READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


class DecodedCache:
    def __init__(self, root: str | os.PathLike, *, cap_bytes: int | None = None, keep: int = 256) -> None:
        self.root = Path(root)
        self.cap_bytes = cap_bytes
        self.keep = keep
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = self.misses = self.evicted = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": OrderedDict()}

    def path(self, sha: str) -> Path:
        return self.root / f"{sha[:32]}{SUFFIX}"

    def _open(self, sha: str, count: int) -> np.ndarray | None:
        path = self.path(sha)
        try:
            if path.stat().st_size != count * SAMPLE_BYTES + DIGEST_BYTES:
                return None
            raw = np.memmap(path, np.uint8, "r")
        except FileNotFoundError:
            return None
        array = raw[: count * SAMPLE_BYTES].reshape(count, 3, 32, 32)
        if checksum.digest(array) != int.from_bytes(bytes(raw[count * SAMPLE_BYTES :]), "little"):
            log.warning("%s does not match its checksum (damaged on disk): decoding it again", path)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        try:
            os.utime(path)  # recency for the LRU eviction
        except OSError as exc:  # read-only cache (another owner, a read-only mount): no recency
            if exc.errno not in READ_ONLY:
                raise
        return array

    @contextlib.contextmanager
    def _locked(self, sha: str) -> Iterator[None]:
        """Hold ``<sha>.lock`` (flock) and delete it when done. A waiter that locked a file
        already unlinked sees another inode under the name and retries on the new file."""
        path = self.root / f"{sha[:32]}.lock"
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield
        finally:
            with contextlib.suppress(PermissionError):
                path.unlink(missing_ok=True)  # still locked: nobody else holds this inode
            os.close(fd)

    def get(self, sha: str, count: int, build: Callable[[], np.ndarray]) -> np.ndarray:
        """The decoded shard ``sha`` (``count`` samples), building and storing it on a miss."""
        array = self._maps.get(sha)
        if array is None:
            array = self._open(sha, count)
            if array is None:
                array = self._fill(sha, count, build)
            self._maps[sha] = array
            while len(self._maps) > self.keep:
                self._maps.popitem(last=False)
        else:
            self.hits += 1
        self._maps.move_to_end(sha)
        return array

    def _fill(self, sha: str, count: int, build: Callable[[], np.ndarray]) -> np.ndarray:
        if self.cap_bytes is not None and count * SAMPLE_BYTES > self.cap_bytes:
            self.misses += 1
            return build()  # bigger than the whole cache: decode and do not keep
        with contextlib.ExitStack() as stack:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                stack.enter_context(self._locked(sha))  # one decoder per shard across processes
            except OSError as exc:
                if exc.errno not in READ_ONLY:
                    raise
                log.warning("cache %s is not writable (%s): decoding without keeping", self.root, exc)
                self.misses += 1
                return build()
            array = self._open(sha, count)
            if array is not None:
                self.hits += 1
                return array
            self.misses += 1
            images = np.ascontiguousarray(build())
            atomic_write_bytes(self.path(sha), images.tobytes()
                               + checksum.digest(images).to_bytes(DIGEST_BYTES, "little"))
            self._evict(keep=self.path(sha))
        return self._open(sha, count) if self.path(sha).exists() else images

    def _evict(self, *, keep: Path) -> None:
        if self.cap_bytes is None:
            return
        files = []
        for path in self.root.glob(f"*{SUFFIX}"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.cap_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)  # mapped elsewhere: the mapping stays valid
                total -= size
                self.evicted += 1

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob(f"*{SUFFIX}")) if self.root.exists() else 0
