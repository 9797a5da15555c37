"""A small HTTP(S) GET client: keep-alive connections per thread, bodies read into one buffer.

``http.client`` directly rather than urllib3 or fsspec/aiohttp: ``readinto`` receives the
body straight from the socket into a preallocated ``bytearray`` of ``Content-Length``
bytes (urllib3 2.x reads chunks and joins them: two extra copies of every block),
there is no event loop to re-create in forked DataLoader workers, and each pool thread
keeps its own persistent connection. Measured on loopback with 1.15 MB ranges: the
client spends ~0.2 cores to receive ~400 MB/s.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from urllib.parse import urljoin, urlsplit

from cifar5m.core.errors import DownloadError

RETRIES = 3  # a keep-alive connection the server closed, or a reset: reconnect and retry
BACKOFF = 0.2  # seconds, doubled per retry
REDIRECTS = 5
TIMEOUT = 60.0


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytearray | memoryview | list) -> None:
        self.status, self.headers, self.body = status, headers, body


Parts = list[tuple[int, memoryview]]  # (offset in the body, where its bytes go), ascending


def read_body(response: http.client.HTTPResponse, into: Parts | None = None) -> bytearray | memoryview | list:
    """The body, received without copies: for a 206 reply and ``into`` (non-overlapping
    parts in body order, e.g. several plan blocks of one request), each part's bytes go
    straight into its view and the filled views are returned (short where the server
    closed early; bytes between parts are skipped); otherwise one new buffer."""
    length = response.getheader("Content-Length")
    if length is None or response.getheader("Transfer-Encoding", "").lower() == "chunked":
        return bytearray(response.read())
    if into is None or response.status != 206:
        into = [(0, memoryview(bytearray(int(length))))]
        whole = True
    else:
        whole = False
    if not int(length):
        response.read()  # marks the reply done, so the connection can be reused
    pos, out = 0, []
    for offset, view in into:
        if offset > pos:  # the bytes between two parts (tar members nobody asked for)
            pos += len(response.read(offset - pos))
        got = 0
        while pos == offset + got and got < len(view):
            n = response.readinto(view[got:])
            if not n:
                break
            got += n
            pos += n
        out.append(view[:got])
    return out[0] if whole else out


class Connections:
    """GETs over one persistent connection per (thread, host); safe to use from many threads
    and, after a fork, from the child (connections are re-made per process)."""

    def __init__(self, *, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {"timeout": self.timeout}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _conn(self, scheme: str, netloc: str, *, fresh: bool) -> http.client.HTTPConnection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.pid, local.conns = os.getpid(), {}
        conn = local.conns.get((scheme, netloc))
        if conn is not None and fresh:
            conn.close()
            conn = None
        if conn is None:
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            conn = local.conns[(scheme, netloc)] = cls(netloc, timeout=self.timeout)
        return conn

    def _once(self, url: str, headers: dict, fresh: bool, into: Parts | None) -> Reply:
        parts = urlsplit(url)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn = self._conn(parts.scheme, parts.netloc, fresh=fresh)
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = read_body(response, into)
        except BaseException:
            conn.close()
            raise
        if response.will_close or not response.isclosed():  # closed early or not read to the end
            conn.close()
        return Reply(response.status, response.headers, body)

    def get(self, url: str, headers: dict | None = None, *, into: Parts | None = None) -> Reply:
        """GET ``url``, following redirects (without ``Authorization`` to another host); retries
        on connection errors (raises DownloadError)."""
        headers = dict(headers or {})
        for _ in range(REDIRECTS + 1):
            reply = self._retrying(url, headers, into)
            location = reply.headers.get("Location")
            if reply.status not in (301, 302, 303, 307, 308) or not location:
                return reply
            target = urljoin(url, location)
            if urlsplit(target)[:2] != urlsplit(url)[:2]:
                # A signed URL of an object store (cifar5m serve s3://...): it refuses a second
                # credential, and a token must not leave the server it was given for.
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise DownloadError(f"GET {url}: more than {REDIRECTS} redirects")

    def _retrying(self, url: str, headers: dict, into: Parts | None) -> Reply:
        for attempt in range(RETRIES + 1):
            try:
                return self._once(url, headers, attempt > 0, into)
            except (OSError, http.client.HTTPException) as exc:
                if attempt == RETRIES:
                    raise DownloadError(f"GET {url} failed: {exc!r}; is the server up?") from exc
                time.sleep(BACKOFF * 2**attempt if attempt else 0)
        raise AssertionError("unreachable")
