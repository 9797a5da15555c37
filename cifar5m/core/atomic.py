"""Atomic file writes (temp file in the same directory, fsync, rename, fsync of the directory)
and the one-line error for a full disk. Every file cifar5m writes in place goes through here."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from cifar5m.core.errors import DiskFullError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and a rename.

    A crash leaves either the old file or the new one under ``path``, never half of one.
    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600, so a
    server or reader running as another user can read it.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise disk_full(path, len(data)) from None
        raise


def megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def disk_full(path: Path, needed: int) -> DiskFullError:
    """The error for a write of ``needed`` bytes to ``path`` that ran out of space."""
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        free = 0
    error = DiskFullError(
        f"no space left on the device of {Path(path).parent} while writing {Path(path).name}: it "
        f"needs {megabytes(needed)}, {megabytes(free)} are free; free some space (or choose another "
        f"output directory) and re-run: finished files are kept")
    error.errno = errno.ENOSPC
    return error


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX needs the directory's entry synced too)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on this platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UMASK = _umask()  # read once: os.umask is process-wide and not thread-safe to toggle
