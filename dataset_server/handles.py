"""Long-lived file descriptors of served files, for ASGI ``pathsend`` by ``/proc/self/fd/N``.

granian opens a pathsend path some time after ``send`` returns, and nothing tells the
app when (its ``http.disconnect`` can come first: measured under 32 clients, a closed
fd gave 404s and a reused fd number sent another shard under this one's headers). So
an fd named to the server is never closed while it may still be opened: each served
file keeps one fd for the life of the process, and an fd whose file was replaced is
closed only ``retire_s`` (10 min) after it was last named. Handing over the fd rather
than the file name keeps the checks of ``resolve`` (O_NOFOLLOW, size/mtime/inode):
the server reads the very file that was checked, even if the name is swapped meanwhile.
"""

from __future__ import annotations

import os
import resource
import time

FD_DIR = "/proc/self/fd"


def default_limit() -> int:
    """Half the process's fd limit (the rest for sockets and per-request fds)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft // 2) if soft != resource.RLIM_INFINITY else 32768


class OpenFiles:
    """One kept fd per served path (the file it was checked against), by path name."""

    def __init__(self, *, limit: int | None = None, retire_s: float = 600.0) -> None:
        self.limit = default_limit() if limit is None else limit
        self.retire_s = retire_s
        self._kept: dict[str, tuple[int, int, int, float]] = {}  # path -> fd, dev, ino, last named
        self._retired: list[tuple[float, int]] = []  # (close after, fd)

    def __len__(self) -> int:
        return len(self._kept) + len(self._retired)

    def path_for(self, path: str, fd: int) -> str | None:
        """A ``/proc/self/fd`` path for the file open as ``fd`` (checked by the caller).

        Takes ownership of ``fd`` when it becomes the kept fd of ``path``; the caller
        closes it only if the returned path does not name it. None when too many fds are
        kept already (the caller sends the file itself).
        """
        now = time.monotonic()
        self._close_retired(now)
        st = os.fstat(fd)
        kept = self._kept.get(path)
        if kept is not None and (kept[1], kept[2]) == (st.st_dev, st.st_ino):
            self._kept[path] = (kept[0], kept[1], kept[2], now)
            return f"{FD_DIR}/{kept[0]}"
        if len(self) >= self.limit:
            return None
        if kept is not None:  # the file was replaced: the old fd may still be opened
            self._retired.append((kept[3] + self.retire_s, kept[0]))
        self._kept[path] = (fd, st.st_dev, st.st_ino, now)
        return f"{FD_DIR}/{fd}"

    def _close_retired(self, now: float) -> None:
        while self._retired and self._retired[0][0] <= now:
            os.close(self._retired.pop(0)[1])

    def close(self) -> None:
        for fd, *_ in self._kept.values():
            os.close(fd)
        for _, fd in self._retired:
            os.close(fd)
        self._kept.clear()
        self._retired.clear()


_HAS_FD_DIR = os.path.isdir(FD_DIR)


def pathsend_supported() -> bool:
    """Whether fds can be named by path here (Linux ``/proc``)."""
    return _HAS_FD_DIR
