"""A small HTTP(S) GET client: keep-alive connections per thread, range bodies read in place.

``http.client`` directly rather than urllib3 or fsspec/aiohttp: ``readinto`` receives the
body straight from the socket into the caller's buffers (urllib3 2.x reads chunks and
joins them: two extra copies of every block), there is no event loop to re-create in
forked DataLoader workers, and each pool thread keeps its own persistent connection.
Measured on loopback with 1.15 MB ranges: the client spends ~0.2 cores to receive ~400 MB/s.

Range reads (``get_range``) lose nothing to a fault on the way: a 429/5xx answer (S3's
503 SlowDown), a reset or a stall (``TIMEOUT`` without a byte) mid-body, or a body shorter
than its ``Content-Length`` is retried with backoff, asking only for the bytes still
missing; after ``RETRIES`` retries one ``DownloadError`` names the URL and byte range.
Several ranges can go in one request (``multi=True``: a ``multipart/byteranges`` reply,
as ``cifar5m serve`` and nginx send; other replies are handed back for the caller).
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from collections.abc import Callable, Sequence
from urllib.parse import urljoin, urlsplit

from cifar5m.core.errors import DownloadError

RETRIES = 5  # retries after the first try
BACKOFF = 0.1  # seconds before the first retry, doubled per retry
MAX_BACKOFF = 4.0
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
REDIRECTS = 5
TIMEOUT = 60.0  # seconds a connection may stay silent (a stalled reply is retried)
CHUNK = 1 << 16  # bytes per readinto: what a fault mid-call loses (the count of a failed call is lost)


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytearray | None) -> None:
        self.status, self.headers, self.body = status, headers, body


class Piece:
    """Bytes ``[start, start + len(view))`` of a file, received into ``view``; ``got`` so far."""

    __slots__ = ("got", "start", "view")

    def __init__(self, start: int, view: memoryview) -> None:
        self.start, self.view, self.got = start, view, 0

    @property
    def end(self) -> int:
        return self.start + len(self.view)

    def data(self) -> memoryview:
        """What arrived (short only where the file ends early)."""
        return self.view[: self.got]


class Transient(Exception):
    """A reply worth asking again for: a 5xx status or a body that ended early."""


def _skip(response: http.client.HTTPResponse, n: int) -> None:
    while n > 0:
        data = response.read(min(n, 1 << 20))
        if not data:
            raise Transient("the body ended early")
        n -= len(data)


def _fill(response: http.client.HTTPResponse, start: int, end: int, pieces: Sequence[Piece]) -> None:
    """Bytes ``[start, end)`` of the file arrive from ``response``: each piece's share goes
    into its view from where it stopped (pieces ascending); other bytes are skipped."""
    pos = start
    for p in pieces:
        at = p.start + p.got
        if at < pos or at >= end or p.got == len(p.view):
            continue
        _skip(response, at - pos)
        pos = at
        view = p.view[p.got : p.got + min(p.end, end) - at]
        while view:
            n = response.readinto(view[:CHUNK])
            if not n:
                raise Transient("the body ended early")
            p.got, pos, view = p.got + n, pos + n, view[n:]
    _skip(response, end - pos)


def _content_range(value: str | None, first: int, length: int) -> tuple[int, int, int | None]:
    """``(start, end, file size or None)`` of ``Content-Range: bytes a-b/size`` (absent:
    ``length`` bytes from ``first``, size unknown)."""
    if not value or not value.strip().startswith("bytes "):
        return first, first + length, None
    span, _, size = value.strip()[6:].partition("/")
    a, _, b = span.partition("-")
    return int(a), int(b) + 1, int(size) if size.strip().isdigit() else None


def _fill_parts(response: http.client.HTTPResponse, boundary: bytes, pieces: Sequence[Piece]) -> int | None:
    """A ``multipart/byteranges`` body: each part's bytes into the pieces it covers; the
    file's size (None: not told)."""
    delimiter, size = b"--" + boundary, None
    while True:
        line = response.readline(4096)
        if not line:
            raise Transient("the body ended early")
        if line.strip() == delimiter + b"--":
            response.read()
            return size
        if line.strip() != delimiter:
            continue  # the preamble, or the line break after a part
        value = None
        while (header := response.readline(4096)).strip():
            name, _, rest = header.decode("latin-1").partition(":")
            if name.strip().lower() == "content-range":
                value = rest
        if not header or value is None:
            raise Transient("a part without Content-Range" if header else "the body ended early")
        start, end, size = _content_range(value, 0, 0)
        _fill(response, start, end, pieces)


def read_body(response: http.client.HTTPResponse) -> bytearray:
    """The whole body in one new buffer (``readinto``: no copies after the socket)."""
    length = response.getheader("Content-Length")
    if length is None or response.getheader("Transfer-Encoding", "").lower() == "chunked":
        return bytearray(response.read())
    body, got = bytearray(int(length)), 0
    view = memoryview(body)
    while got < len(body):
        n = response.readinto(view[got:])
        if not n:
            raise Transient(f"the body ended after {got} of {len(body)} bytes")
        got += n
    if not len(body):
        response.read()  # marks the reply done, so the connection can be reused
    return body


def _spec(pieces: Sequence[Piece], multi: bool) -> str:
    """The ``Range`` header for what ``pieces`` still miss: each its range, or one span."""
    if multi:
        return "bytes=" + ",".join(f"{p.start + p.got}-{p.end - 1}" for p in pieces)
    return f"bytes={pieces[0].start + pieces[0].got}-{pieces[-1].end - 1}"


class Connections:
    """GETs over one persistent connection per (thread, host); safe to use from many threads
    and, after a fork, from the child (connections are re-made per process)."""

    def __init__(self, *, timeout: float | None = None) -> None:
        self.timeout = TIMEOUT if timeout is None else timeout
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

    def _once(self, url: str, headers: dict, fresh: bool,
              receive: Callable[[http.client.HTTPResponse], None] | None) -> Reply:
        """One GET; a 206 body goes to ``receive``, any other body into a new buffer."""
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn = self._conn(parts.scheme, parts.netloc, fresh=fresh)
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = None
            if response.status == 206 and receive is not None:
                receive(response)
            else:
                body = read_body(response)
        except BaseException:
            conn.close()
            raise
        if response.will_close or not response.isclosed():  # closed early or not read to the end
            conn.close()
        if response.status in RETRY_STATUS:
            raise Transient(f"HTTP {response.status} {response.reason}")
        return Reply(response.status, response.headers, body)

    def _retrying(self, url: str, headers: dict, what: Callable[[], str],
                  receive: Callable[[http.client.HTTPResponse], None] | None = None,
                  spec: Callable[[], str | None] | None = None) -> Reply:
        """``_once`` until it gives a reply, following redirects (without ``Authorization`` to
        another host); ``spec`` makes the Range of
        each try (what is still missing; None: nothing is); ``what`` names the bytes in the
        final error."""
        tries, redirects = 0, 0
        while True:
            wanted = spec() if spec else None
            if spec and wanted is None:  # all arrived before a fault after them
                return Reply(206, http.client.HTTPMessage(), None)
            try:
                reply = self._once(url, {**headers, "Range": wanted} if wanted else headers, tries > 0, receive)
            except (OSError, http.client.HTTPException, Transient) as exc:
                tries += 1
                refused = isinstance(exc, ConnectionRefusedError)  # no server: no long wait
                if tries > RETRIES or (refused and tries > 1):
                    hint = "; is the server up?" if isinstance(exc, OSError) else ""
                    raise DownloadError(f"GET {url}{what()} failed after {tries} tries: {exc}{hint}") from None
                stale = tries == 1 and isinstance(exc, http.client.RemoteDisconnected)
                time.sleep(0 if stale else min(MAX_BACKOFF, BACKOFF * 2 ** (tries - 1)))
                continue
            location = reply.headers.get("Location")
            if reply.status not in (301, 302, 303, 307, 308) or not location:
                return reply
            redirects += 1
            if redirects > REDIRECTS:
                raise DownloadError(f"GET {url}: more than {REDIRECTS} redirects")
            target = urljoin(url, location)
            if urlsplit(target)[:2] != urlsplit(url)[:2]:
                # A signed URL of an object store (cifar5m serve s3://...): it refuses a second
                # credential, and a token must not leave the server it was given for.
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target

    def get(self, url: str, headers: dict | None = None) -> Reply:
        """GET ``url`` whole (body in ``reply.body``), retrying faults (raises DownloadError)."""
        return self._retrying(url, dict(headers or {}), str)

    def get_range(self, url: str, headers: dict | None, pieces: Sequence[Piece], *,
                  multi: bool = False) -> Reply:
        """Receive ``pieces`` (ascending, not overlapping) of ``url`` in place: one range from
        the first to the last (bytes between them skipped), or with ``multi`` each its own
        range in one request. A 206 reply fills them (``reply.body`` None; pieces past the
        file's end stay short); another reply (200, 404, 416) comes back with its body."""
        if not pieces:
            raise ValueError("get_range needs at least one piece")

        def todo() -> list[Piece]:
            return [p for p in pieces if p.got < len(p.view)]

        def receive(response: http.client.HTTPResponse) -> None:
            missing = todo()
            kind = response.getheader("Content-Type", "")
            if kind.startswith("multipart/byteranges") and "boundary=" in kind:
                boundary = kind.split("boundary=", 1)[1].split(";")[0].strip().strip('"')
                size = _fill_parts(response, boundary.encode("latin-1"), missing)
            else:
                first = missing[0].start + missing[0].got
                start, end, size = _content_range(response.getheader("Content-Range"), first,
                                                  int(response.getheader("Content-Length", "0")))
                _fill(response, start, end, missing)
            if size is not None and any(p.start + p.got < min(p.end, size) for p in missing):
                raise Transient("the reply left out bytes the file has")  # ask for them again

        def what() -> str:
            missing = todo() or pieces
            return f" (bytes {missing[0].start + missing[0].got}-{missing[-1].end - 1})"

        return self._retrying(url, dict(headers or {}), what, receive,
                              lambda: _spec(missing, multi) if (missing := todo()) else None)
