"""aiohttp as the HTTP server of the ASGI app, with file bodies sent by ``sendfile``.

No ASGI server offers the zero-copy extension (``http.response.zerocopysend``): uvicorn
copies every chunk through Python, granian reads files into Rust buffers and copies them
out again. aiohttp's HTTP server (llhttp parser, asyncio transports) runs the app here
through ``AsgiBridge``, which advertises the extension and answers it with
``loop.sendfile``: the kernel moves page-cache pages to the socket, no byte is copied
in user space. Measured with ``benchmarks/serve_bench.py`` (32 clients, 2-core box, 60 s):
0.33 CPU-s per GB on the wire against 0.66-0.68 for granian and 0.59 for ``http.server``,
and 3.6x ``http.server``'s MB/s.

The bridge is the app's only view of aiohttp: a scope from the request as sent
(``raw_path`` is the request target's path, percent-encoding untouched), the body
streamed to ``receive`` as it arrives, and the response messages mapped onto one
``StreamResponse``. Requests past ``limit_concurrency`` per worker get 503.
"""

from __future__ import annotations

import asyncio
import logging
import os
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message

from dataset_server.responses import ZEROCOPYSEND

log = logging.getLogger("dataset_server")

_ASGI = {"version": "3.0", "spec_version": "2.4"}
_CHUNK = 1024 * 1024  # reads of the copy fallback
_SENDFILE = getattr(os, "sendfile", None)


class AsgiBridge:
    """An aiohttp request handler that runs one ASGI app, ``sendfile`` included."""

    def __init__(self, app: ASGIApp, *, limit_concurrency: int = 1024) -> None:
        self.app = app
        self.limit_concurrency = limit_concurrency
        self.active = 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.active >= self.limit_concurrency:
            return web.json_response({"error": "server busy, retry later"}, status=503)
        self.active += 1
        exchange = _Exchange(request)
        try:
            await self.app(scope_of(request), exchange.receive, exchange.send)
        except Exception as exc:
            # A client that went away (mid-body, or while sending its own body) is routine,
            # not worth a traceback.
            if isinstance(exc, (ConnectionError, ClientDisconnect)):
                log.debug("client gone: %s %s: %r", request.method, request.raw_path, exc)
            else:
                log.exception("error handling %s %s", request.method, request.raw_path)
            if exchange.response is not None and exchange.response.prepared:
                # Part of the body is out: the only honest end is a closed connection.
                _close(request)
                return exchange.response
            return web.json_response({"error": "internal server error"}, status=500)
        finally:
            self.active -= 1
            exchange.finish()
        return exchange.outcome()


def scope_of(request: web.BaseRequest) -> dict:
    """The ASGI HTTP scope of an aiohttp request, built from the request line as sent."""
    target, _, query = request.raw_path.partition("?")
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    host = transport.get_extra_info("sockname") if transport is not None else None
    return {
        "type": "http", "asgi": _ASGI, "scheme": "http",
        "http_version": f"{request.version.major}.{request.version.minor}",
        "method": request.method,
        "path": unquote(target),
        "raw_path": target.encode("utf-8", "surrogateescape"),
        "query_string": query.encode("utf-8", "surrogateescape"),
        "root_path": "",
        "headers": [(k.lower(), v) for k, v in request.raw_headers],
        "client": tuple(peer[:2]) if isinstance(peer, tuple) else None,
        "server": tuple(host[:2]) if isinstance(host, tuple) else None,
        "extensions": {ZEROCOPYSEND: {}},
    }


class _Exchange:
    """One request's ``receive`` and ``send``, writing into one aiohttp response."""

    def __init__(self, request: web.BaseRequest) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self._body_done = False
        self._start: Message | None = None
        self.owed: int | None = None  # Content-Length not yet sent (streamed bodies)
        self.disconnected = False
        self._empty = False  # the response may carry no body (HEAD, 1xx, 204, 304)
        self._done = asyncio.get_running_loop().create_future()

    def outcome(self) -> web.StreamResponse:
        """What aiohttp gets once the app returned normally."""
        request = self.request
        if self.response is None:
            if self._start is not None:  # headers and no body message: an empty body
                return self._response(web.Response)
            if self.disconnected:  # nobody to answer
                _close(request)
                return web.Response(status=499)
            log.error("the app sent no response to %s %s", request.method, request.raw_path)
            return web.json_response({"error": "internal server error"}, status=500)
        if self.owed:  # fewer bytes than its Content-Length: never reuse the connection
            log.error("the app sent %d bytes less than it declared: %s %s", self.owed, request.method,
                      request.raw_path)
            _close(request)
        return self.response

    def finish(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    async def receive(self) -> Message:
        if not self._body_done:
            # Chunks as they arrive: the app bounds the body (paths-info: 1 MiB), so a big
            # body is refused without being read whole.
            try:
                chunk = await self.request.content.readany()
            except ConnectionError:  # the client went away while sending its body
                self._body_done = self.disconnected = True
                return {"type": "http.disconnect"}
            self._body_done = self.request.content.at_eof()
            return {"type": "http.request", "body": chunk, "more_body": not self._body_done}
        await self._done  # the response is complete: the app has nothing left to wait for
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._start = message
            self._empty = self.request.method == "HEAD" or message["status"] in (204, 304) or message["status"] < 200
            return
        if self._start is None:
            raise RuntimeError(f"ASGI message {kind!r} before http.response.start")
        if kind not in ("http.response.body", ZEROCOPYSEND):
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        final = not message.get("more_body", False)
        if self.response is None:
            if kind == "http.response.body" and final:
                # The whole body in one message (API answers, HEAD, small ranges): aiohttp
                # sends it with the headers in one write once the app returns.
                self.response = self._response(web.Response, body=message.get("body", b""))
                return
            self.response = self._response(web.StreamResponse)
            if not self._empty:  # bytes the body still owes; None: no length (chunked)
                self.owed = self.response.content_length
            await self.response.prepare(self.request)  # sends the headers now (before sendfile)
        # HEAD, 204 and 304 have no body whatever the app sends (starlette sends one for
        # HEAD too; written out, the client would read it as the next response).
        if not self._empty:
            if kind == ZEROCOPYSEND:
                await self._sendfile(message)
            elif message.get("body"):
                self._owe(len(message["body"]))
                await self.response.write(message["body"])
        if final:
            await self.response.write_eof()

    def _owe(self, n: int) -> None:
        if self.owed is not None:
            if n > self.owed:
                raise RuntimeError(f"the app sends {n} body bytes with {self.owed} left of its Content-Length")
            self.owed -= n

    def _response(self, cls: type[web.StreamResponse], **body: bytes) -> web.StreamResponse:
        headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in self._start.get("headers", ()))
        return cls(status=self._start["status"], headers=headers, **body)

    async def _sendfile(self, message: Message) -> None:
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        file = message["file"]
        offset = message.get("offset", 0)
        count = message.get("count")
        if count is None:
            count = os.fstat(file.fileno()).st_size - offset
        if self.owed is None:  # chunked: the bytes must go through aiohttp's framing
            sent = await self._copy(file.fileno(), offset, count)
        else:
            self._owe(count)  # before a byte goes out: sendfile bypasses aiohttp's length check
            sent = _sendfile_now(transport, file.fileno(), offset, count)
            if sent < count:
                try:
                    # The rest as the socket drains: asyncio's sendfile (native os.sendfile on
                    # a plain TCP transport; it reads and writes where the platform has none).
                    sent += await asyncio.get_running_loop().sendfile(transport, file, offset + sent, count - sent)
                except NotImplementedError:  # an event loop without sendfile (uvloop)
                    sent += await self._copy(file.fileno(), offset + sent, count - sent)
        if sent != count:  # the file shrank under us: a short body, never padded
            raise OSError(f"sent {sent} of {count} bytes: the file ended early")

    async def _copy(self, fd: int, offset: int, count: int) -> int:
        sent = 0
        while sent < count:
            data = await asyncio.to_thread(os.pread, fd, min(_CHUNK, count - sent), offset + sent)
            if not data:
                break
            await self.response.write(data)
            sent += len(data)
        return sent


def build_application(app: ASGIApp, *, limit_concurrency: int = 1024, max_headers: int = 100,
                      max_header_bytes: int = 64 * 1024) -> web.Application:
    """An aiohttp application that sends every request to ``app``.

    aiohttp's parser bounds come second to the app's ``Limits`` (431/414 with a Hub error):
    a request line or one header of up to ``max_header_bytes`` and twice ``max_headers``
    headers reach the app; beyond those the parser refuses the request itself (400).
    """
    aio = web.Application(handler_args={"max_line_size": max_header_bytes, "max_field_size": max_header_bytes,
                                        "max_headers": 2 * max_headers})
    aio.router.add_route("*", "/{path:.*}", AsgiBridge(app, limit_concurrency=limit_concurrency).handle)
    return aio


def _sendfile_now(transport: asyncio.Transport, fd: int, offset: int, count: int) -> int:
    """Bytes of ``[offset, offset + count)`` the socket takes right away by ``os.sendfile``.

    Most bodies fit the socket's send buffer, and then this is the whole body. asyncio's
    own sendfile sets up a waiter and pauses reading around it (two more epoll changes):
    4 KB ranges under 32 clients cost 307 -> 245 us of server CPU each with this first.
    Only with nothing queued in the transport (the headers went out in ``prepare``), so
    the body cannot overtake them.
    """
    sock = transport.get_extra_info("socket")
    if (_SENDFILE is None or sock is None or transport.get_write_buffer_size()
            or transport.get_extra_info("sslcontext") is not None):  # TLS: never the raw socket
        return 0
    sent = 0
    try:
        while sent < count:
            n = _SENDFILE(sock.fileno(), fd, offset + sent, count - sent)
            if n == 0:  # end of file: the caller reports the short body
                break
            sent += n
    except (BlockingIOError, InterruptedError):  # the send buffer is full: asyncio waits for room
        pass
    return sent


def _close(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.close()
