"""The ASGI application: routing on the raw path, request limits and the access log.

Routing uses ``scope["raw_path"]``, split on ``/`` before percent-decoding each part:
clients send a revision as ``quote(rev, safe="")`` (``refs%2Fpr%2F1``) and a tree
sub-path the same way, and a decoded path would move those slashes into the route.
Decoded parts never reach the file system: files are looked up by name in the
dataset's own list (see ``repo.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dataset_server import api
from dataset_server.auth import AccessPolicy
from dataset_server.context import MAIN, Denied, ServerContext
from dataset_server.repo import HashCache, Library
from dataset_server.resolve import resolve
from dataset_server.responses import PATHSEND, ZEROCOPYSEND, FileBody, hub_error

access_log = logging.getLogger("dataset_server.access")

# huggingface_hub asks for this once per process; an empty answer is cached for 24 h.
_HARNESSES = {"standardEnvVars": [], "harnesses": {}}


def split_path(scope: Scope) -> list[str] | None:
    """Percent-decoded parts of the request path, or None if it is not valid UTF-8."""
    raw = scope.get("raw_path") or scope["path"].encode()
    try:
        return [unquote(p.decode("ascii"), errors="strict") for p in raw.split(b"/") if p]
    except (UnicodeDecodeError, ValueError):
        return None


async def dispatch(request: Request) -> Response | FileBody:
    """The API and health routes; GET/HEAD of ``.../resolve/...`` never get here (``FastResolve``)."""
    ctx: ServerContext = request.app.state.ctx
    parts = split_path(request.scope) or []
    method = request.method
    try:
        if parts[:2] == ["api", "datasets"]:
            return await _api(ctx, request, parts[2:], method)
        if parts == ["api", "agent-harnesses"] and method in ("GET", "HEAD"):
            return JSONResponse(_HARNESSES)
        if parts == ["healthz"]:
            return JSONResponse({"ok": True})
    except Denied as denied:
        return denied.response
    return hub_error(404, None, "Not Found")


async def _api(ctx: ServerContext, request: Request, parts: list[str], method: str) -> Response:
    if not parts and method in ("GET", "HEAD"):
        return await api.list_datasets(ctx, request)
    if len(parts) < 2:
        return hub_error(404, None, "Not Found")
    org, name, rest = parts[0], parts[1], parts[2:]
    if method == "POST":
        if len(rest) >= 2 and rest[0] == "paths-info":
            return await api.paths_info(ctx, request, org, name, "/".join(rest[1:]))
        return hub_error(405, None, "Method Not Allowed")
    if not rest:
        return await api.dataset_info(ctx, request, org, name, MAIN)
    if rest[0] == "revision" and len(rest) >= 2:
        return await api.dataset_info(ctx, request, org, name, "/".join(rest[1:]))
    if rest[0] == "tree" and len(rest) >= 2:
        return await api.tree(ctx, request, org, name, rest[1], "/".join(rest[2:]))
    return hub_error(404, None, "Not Found")


class FastResolve:
    """File downloads (GET/HEAD .../resolve/...) straight to ``resolve``, past the router.

    Starlette's exception middleware, router and request wrapper cost ~15 us of the ~45 us
    a HEAD spends in the app (measured by calling the app directly); the answers are
    those of ``dispatch``.
    """

    def __init__(self, app: ASGIApp, *, ctx: ServerContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts = split_path(scope) if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") else None
        if not parts or len(parts) < 5 or parts[0] != "datasets" or parts[3] != "resolve":
            await self.app(scope, receive, send)
            return
        try:
            response = await resolve(self.ctx, Request(scope, receive), parts[1], parts[2], parts[4],
                                     "/".join(parts[5:]))
        except Denied as denied:
            response = denied.response
        await response(scope, receive, send)


class Limits:
    """Refuses too many or too big headers (431), long URLs (414), other methods (405).

    uvicorn's h11 parser bounds only headers that arrive in pieces
    (``h11_max_incomplete_event_size``): 100 KB sent at once passes it, hence the
    checks here. Bodies are bounded where they are read (paths-info).
    """

    def __init__(self, app: ASGIApp, *, max_headers: int = 100, max_header_bytes: int = 64 * 1024,
                 max_url_bytes: int = 8 * 1024) -> None:
        self.app = app
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self.max_url_bytes = max_url_bytes

    def _refusal(self, scope: Scope) -> Response | None:
        headers = scope["headers"]
        if len(headers) > self.max_headers:
            return hub_error(431, None, f"more than {self.max_headers} request headers")
        if sum(len(k) + len(v) for k, v in headers) > self.max_header_bytes:
            return hub_error(431, None, f"request headers over {self.max_header_bytes} bytes")
        if len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) > self.max_url_bytes:
            return hub_error(414, None, f"URL over {self.max_url_bytes} bytes")
        if scope["method"] not in ("GET", "HEAD", "POST"):
            return hub_error(405, None, "Method Not Allowed")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


class AccessLog:
    """One line per request: client, request line, status, body bytes, range, time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not access_log.isEnabledFor(logging.INFO):
            # --no-access-log: no send wrapper and no line to format (~10 us a request).
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status, sent, length = 0, 0, 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent, length
            if message["type"] == "http.response.start":
                status = message["status"]
                length = int(dict(message["headers"]).get(b"content-length", 0))
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == PATHSEND:
                sent += length  # the server sends the whole file itself
            elif message["type"] == ZEROCOPYSEND:
                sent += message.get("count") or length
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            client = scope.get("client") or ("-", 0)
            query = scope.get("query_string", b"").decode("latin-1")
            target = scope.get("raw_path", b"").decode("latin-1") + (f"?{query}" if query else "")
            rng = dict(scope["headers"]).get(b"range", b"").decode("latin-1")
            access_log.info('%s "%s %s" %d %d %s%.1fms', client[0], scope["method"], target, status,
                            sent, f"range={rng} " if rng else "", (time.perf_counter() - start) * 1e3)


def create_app(*, root: str | Path, tokens: str | Path | None = None, page_size: int = 1000,
               max_body: int = 1024 * 1024, max_headers: int = 100, max_header_bytes: int = 64 * 1024,
               scan_max_age: float = 1.0, hash_cache: str | Path | None = None) -> Starlette:
    """The server for every dataset under ``root`` (``root/<org>/<name>/manifest.json``)."""
    hashes = HashCache()
    if hash_cache is not None:
        hashes.load(Path(hash_cache))
    ctx = ServerContext(Library(Path(root), hashes), AccessPolicy.from_file(tokens),
                        page_size=page_size, max_body=max_body, scan_max_age=scan_max_age)
    app = Starlette(routes=[Route("/{path:path}", dispatch, methods=["GET", "HEAD", "POST"])])
    app.state.ctx = ctx
    app.add_middleware(FastResolve, ctx=ctx)
    app.add_middleware(Limits, max_headers=max_headers, max_header_bytes=max_header_bytes)
    app.add_middleware(AccessLog)
    return app
