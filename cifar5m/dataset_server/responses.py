"""Responses in the Hub's shapes: typed errors, and file bodies sent by ``sendfile``.

huggingface_hub turns an error into its own exception by the ``X-Error-Code`` header
(``utils/_http.py:hf_raise_for_status``), whatever the status, and reads the message
from ``X-Error-Message`` or the JSON body's ``error``; so every error here carries both.

A file body goes out from the descriptor ``resolve`` opened and checked (O_NOFOLLOW,
size/mtime/inode of the scanned entry), never re-opened by name: ``os.sendfile`` first,
for what the socket takes at once, then asyncio's ``loop.sendfile`` as it drains. The
kernel moves page-cache pages to the socket; no byte is copied in user space.
"""

from __future__ import annotations

import asyncio
import os
import re

from aiohttp import web

REPO_COMMIT = "X-Repo-Commit"
_CHUNK = 1024 * 1024  # reads of the copy fallback (an event loop without sendfile)
_SENDFILE = getattr(os, "sendfile", None)
# Control characters (C0, DEL, C1) never reach a header or a log line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str, limit: int = 300) -> str:
    """``text`` with control characters and non-ASCII shown as ``?``, at most ``limit`` chars."""
    clean = _CONTROL.sub("?", text).encode("ascii", "replace").decode()
    return clean if len(clean) <= limit else clean[:limit] + "..."


def hub_error(status: int, code: str | None, message: str, *, commit: str | None = None,
              headers: dict[str, str] | None = None) -> web.Response:
    """A JSON error the clients map to a typed exception via ``X-Error-Code``."""
    message = printable(message, 1000)
    out = {"X-Error-Message": message}
    if code:
        out["X-Error-Code"] = code
    if commit:
        # With the commit, the client records a negative cache entry for the path.
        out[REPO_COMMIT] = commit
    out.update(headers or {})
    return web.json_response({"error": message}, status=status, headers=out)


def repo_not_found(repo_id: str) -> web.Response:
    # 401 for both "does not exist" and "private, wrong token", as the Hub does for
    # anonymous requests: a caller cannot tell which.
    return hub_error(401, "RepoNotFound",
                     f"Repository not found: dataset {repo_id} does not exist or needs a token "
                     "(pass token=... or set HF_TOKEN)")


class Denied(Exception):
    """Carries the error response a lookup ended in."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


class FdResponse(web.StreamResponse):
    """Bytes ``[start, end)`` of an open file descriptor, which it closes when done."""

    def __init__(self, fd: int, start: int, end: int, *, status: int, headers: dict[str, str]) -> None:
        super().__init__(status=status, headers=headers)
        self.fd, self.start, self.end = fd, start, end
        self.content_length = end - start
        self.sent = 0  # body bytes that went out (the access log's size)

    async def prepare(self, request: web.BaseRequest):  # type: ignore[override]
        try:
            writer = await super().prepare(request)  # sends the headers (StreamResponse: at once)
            if request.method != "HEAD" and self.end > self.start and writer is not None:
                await self._send(request, writer)
            await self.write_eof()
            return writer
        finally:
            os.close(self.fd)
            self.fd = -1

    async def _send(self, request: web.BaseRequest, writer) -> None:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        count = self.end - self.start
        self.sent = _sendfile_now(transport, self.fd, self.start, count)
        if self.sent < count:
            try:
                # The rest as the socket drains (native os.sendfile on a plain TCP transport).
                with open(self.fd, "rb", buffering=0, closefd=False) as file:
                    self.sent += await asyncio.get_running_loop().sendfile(
                        transport, file, self.start + self.sent, count - self.sent)
            except NotImplementedError:  # an event loop without sendfile
                self.sent += await self._copy(writer, self.start + self.sent, self.end)
        if self.sent != count:  # the file shrank under us: a short body, never padded
            transport.close()
            raise ConnectionResetError(f"sent {self.sent} of {count} bytes: the file ended early")

    async def _copy(self, writer, pos: int, end: int) -> int:
        sent = 0
        while pos + sent < end:
            data = await asyncio.to_thread(os.pread, self.fd, min(_CHUNK, end - pos - sent), pos + sent)
            if not data:
                break
            await writer.write(data)
            sent += len(data)
        return sent


def _sendfile_now(transport: asyncio.Transport, fd: int, offset: int, count: int) -> int:
    """Bytes of ``[offset, offset + count)`` the socket takes right away by ``os.sendfile``.

    Most bodies fit the socket's send buffer, and then this is the whole body. asyncio's
    own sendfile sets up a waiter and pauses reading around it (two more epoll changes):
    4 KB ranges under 32 clients cost 307 -> 245 us of server CPU each with this first.
    Only with nothing queued in the transport, so the body cannot overtake the headers.
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
