"""The official CIFAR-10 archive (the python version, as torchvision fetches it): downloaded
once into the user cache, resumed after a break, checked against its published MD5.

``fetch_cifar10()`` returns the path of the checked archive, which ``cifar5m import`` reads
as ``cifar10-python``. The URL and checksum can be overridden (``CIFAR5M_CIFAR10_URL``,
``CIFAR5M_CIFAR10_MD5``) for a mirror, and for tests against a local server. A host that
cannot be reached at all raises ``OfflineError`` (callers such as the demo go on without);
a wrong checksum keeps nothing.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from cifar5m.core.errors import DownloadError, OfflineError
from cifar5m.shards.lock import DirectoryLock

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"  # published with the archive (torchvision checks the same)
CHUNK = 1 << 20
TIMEOUT_S = 20  # per connect and per read: a stalled host fails instead of hanging the demo


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cifar5m``, else ``~/.cache/cifar5m``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cifar5m"


def fetch_cifar10(*, cache: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The checked archive in ``cache`` (default ``cache_dir()``), downloaded if not there."""
    url = os.environ.get("CIFAR5M_CIFAR10_URL", URL)
    md5 = os.environ.get("CIFAR5M_CIFAR10_MD5", MD5).lower()
    root = Path(cache) if cache is not None else cache_dir()
    final = root / Path(url.split("?")[0]).name
    with DirectoryLock(root, what="used to download CIFAR-10"):
        if final.is_file() and _md5(final) == md5:
            return final
        part = final.with_name(final.name + ".part")
        _download(url, part, progress=progress)
        got = _md5(part)
        if got != md5:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url}: the download's MD5 is {got}, not the published {md5}; "
                                f"nothing was kept, run the same command again")
        part.replace(final)
        return final


def _download(url: str, part: Path, *, progress: bool) -> None:
    """Into ``part``, resuming from its size with a Range request where the server allows."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        reply = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # already complete: the checksum decides
            return
        raise DownloadError(f"{url} answered HTTP {exc.code}; try again later") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OfflineError(f"cannot reach {url} ({reason})") from None
    with reply:
        if reply.status != 206:  # the whole file: start over
            have = 0
        size = int(reply.headers.get("Content-Length", 0)) + have or None
        with open(part, "ab" if have else "wb") as out, tqdm(
                total=size, initial=have, unit="B", unit_scale=True, desc="CIFAR-10",
                disable=not progress) as bar:
            while True:
                try:
                    chunk = reply.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:  # a reset, a timeout, a short body
                    raise DownloadError(f"{url}: the download broke after {out.tell():,} bytes "
                                        f"({exc}); run the same command again to resume") from None
                if not chunk:
                    break
                out.write(chunk)
                bar.update(len(chunk))
    if size is not None and part.stat().st_size < size:
        raise DownloadError(f"{url}: the download stopped at {part.stat().st_size:,} of {size:,} "
                            f"bytes; run the same command again to resume")


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
