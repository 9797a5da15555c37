"""One writer per output directory: an exclusive ``flock`` on ``<dir>/.cifar5m.lock``.

Every command that writes a directory (``import``, ``generate``, ``download
--local-dir``, the trainers' run directories) holds this lock for as long as it
writes. A second writer is refused at once (non-blocking) with an
``OutputLockedError`` naming the directory and the PID (and host) that holds it.

The lock is the kernel's, not the file's: it goes away when its holder exits, however
it exits (``kill -9`` included), so a lock left by a dead process never blocks; the
file it leaves behind only records who held it last. A clean release deletes the file
while still holding the lock; a process that opened the file just before that sees
another inode under the name once it has locked, and starts over on the new file.

On NFS, Linux implements ``flock`` with NFS byte-range locks (NLM on v3, the protocol
itself on v4), so writers on different clients exclude each other as long as the
server supports locking; a mount with ``-o nolock`` (or ``local_lock=flock``) keeps
locks on one client, and two machines can then both write: do not run two writers
of one directory on such a mount. A client that dies holding the lock releases it
when the server notices (the v4 lease time, 90 s by default).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from cifar5m.core.errors import OutputLockedError, OutputNotWritableError

LOCK_NAME = ".cifar5m.lock"
_ATTEMPTS = 20  # re-opens when the file was replaced under us (a holder released meanwhile)


def holder(root: str | os.PathLike) -> dict | None:
    """What the lock file of ``root`` says about its (last) holder, or None."""
    try:
        text = (Path(root) / LOCK_NAME).read_text()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def _describe(info: dict | None) -> str:
    if not info:
        return "PID unknown (it is starting)"
    where = "" if info.get("host") == socket.gethostname() else f" on {info.get('host')}"
    return f"PID {info.get('pid')}{where}: {info.get('command', '?')}"


class DirectoryLock:
    """An exclusive, non-blocking lock on a directory (created if missing).

    >>> with DirectoryLock("out"):   # doctest: +SKIP
    ...     write_things_into("out")
    """

    def __init__(self, root: str | os.PathLike, *, what: str = "written") -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> DirectoryLock:
        if self._fd is not None:
            return self
        missing = [p for p in (self.root, *self.root.parents) if not p.exists()]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (PermissionError, FileExistsError, NotADirectoryError) as exc:
            raise OutputNotWritableError(f"{self.root} cannot be created ({exc.strerror}); choose "
                                         f"another output directory") from None
        self._created = missing  # deepest first: removed on release if still empty
        for _ in range(_ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except PermissionError as exc:
                raise OutputNotWritableError(f"{self.root} is not writable ({exc.strerror}); choose "
                                             f"another output directory") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputLockedError(
                    f"{self.root} is being {self.what} in another process ({self._holder()}); "
                    f"wait for it to finish or stop it, then re-run") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # released and deleted between our open and our lock: retry
        else:  # pragma: no cover - needs ~20 holders releasing in a row
            raise OutputLockedError(f"{self.root}: could not take {self.path}; re-run")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200],
                "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def _holder(self) -> str:
        info = holder(self.root)
        for _ in range(10):  # the holder writes its PID right after locking
            if info:
                break
            time.sleep(0.01)
            info = holder(self.root)
        return _describe(info)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # still locked: nobody else can hold this inode
        os.close(self._fd)
        self._fd = None
        for directory in self._created:  # a lock that was all there was leaves nothing behind
            try:
                directory.rmdir()
            except OSError:  # not empty (something was written), or gone
                break

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["LOCK_NAME", "DirectoryLock", "holder"]
