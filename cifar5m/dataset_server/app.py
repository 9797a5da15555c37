"""The aiohttp application: routing on the raw path, request limits and the access log.

Routing uses the request target as sent (``request.raw_path``), split on ``/`` before
percent-decoding each part: clients send a revision as ``quote(rev, safe="")``
(``refs%2Fpr%2F1``) and a tree sub-path the same way, and a decoded path would move
those slashes into the route. Decoded parts never reach the file system: files are
looked up by name in the dataset's own list (see ``repo.py``).

Bounds: aiohttp's parser refuses a request line or header over ``max_header_bytes``
and more than twice ``max_headers`` headers (400); before those, ``Handler`` answers
431 past ``max_headers`` headers or ``max_header_bytes`` of them, 414 past 8 KiB of
URL, 405 for other methods, 505 for HTTP versions other than 1.0 and 1.1, and 503 past
``limit_concurrency`` requests in flight. Bodies are read only by paths-info, bounded by
aiohttp's ``client_max_size`` (413).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.abc import AbstractAccessLogger

from cifar5m.dataset_server import api, viewer
from cifar5m.dataset_server.auth import AccessPolicy
from cifar5m.dataset_server.config import ServeConfig
from cifar5m.dataset_server.context import MAIN, ServerContext
from cifar5m.dataset_server.hashes import HashCache
from cifar5m.dataset_server.resolve import resolve
from cifar5m.dataset_server.responses import Denied, FdResponse, hub_error, printable
from cifar5m.dataset_server.store_root import open_library

CTX = web.AppKey("ctx", ServerContext)
# huggingface_hub asks for this once per process; an empty answer is cached for 24 h.
_HARNESSES = {"standardEnvVars": [], "harnesses": {}}
_METHODS = ("GET", "HEAD", "POST")
_MAX_URL_BYTES = 8 * 1024
# On every answer, pages and files alike: no script, frame, form or foreign resource, nothing
# sniffed into another type, no embedding in another site, no URL of ours sent elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def split_path(raw_path: str) -> list[str] | None:
    """Percent-decoded parts of the request path, or None if it is not valid UTF-8."""
    target = raw_path.partition("?")[0]
    try:
        return [unquote(p, errors="strict") for p in target.split("/") if p]
    except UnicodeDecodeError:
        return None


class Handler:
    """Every request: bounds first, then the route; a ``Denied`` lookup is its answer."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.active = 0

    def _refusal(self, request: web.Request) -> web.Response | None:
        if request.version not in (HttpVersion10, HttpVersion11):
            # aiohttp frames every reply as HTTP/1.1 but writes the request's version in
            # its status line; no public API sets it.
            request._cache["version"] = HttpVersion11  # the reified property
            refusal = hub_error(505, None, "HTTP/1.0 and HTTP/1.1 only")
            refusal.force_close()
            return refusal
        headers, config = request.raw_headers, self.ctx.config
        if len(headers) > config.max_headers:
            return hub_error(431, None, f"more than {config.max_headers} request headers")
        if sum(len(k) + len(v) for k, v in headers) > config.max_header_bytes:
            return hub_error(431, None, f"request headers over {config.max_header_bytes} bytes")
        if len(request.raw_path) > _MAX_URL_BYTES:
            return hub_error(414, None, f"URL over {_MAX_URL_BYTES} bytes")
        if request.method not in _METHODS:
            return hub_error(405, None, "Method Not Allowed")
        if self.active >= config.limit_concurrency:
            return hub_error(503, None, "server busy, retry later")
        return None

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        response = self._refusal(request) or await self._answer(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        try:
            return await self._route(request, split_path(request.raw_path))
        except Denied as denied:
            return denied.response
        finally:
            self.active -= 1

    async def _route(self, request: web.Request, parts: list[str] | None) -> web.StreamResponse:
        ctx, method = self.ctx, request.method
        if parts is None:
            return hub_error(400, None, "the request path is not valid UTF-8")
        if method in ("GET", "HEAD"):
            if len(parts) >= 5 and parts[0] == "datasets" and parts[3] == "resolve":
                return await resolve(ctx, request, parts[1], parts[2], parts[4], "/".join(parts[5:]))
            if not parts or (len(parts) == 3 and parts[0] == "datasets"):
                return await viewer.page(ctx, request, *parts[1:])
            if len(parts) == 5 and parts[0] == "datasets" and parts[3] == "samples":
                return await viewer.samples(ctx, request, parts[1], parts[2], parts[4])
            if parts == ["api", "agent-harnesses"]:
                return web.json_response(_HARNESSES)
            if parts == ["healthz"]:
                return web.json_response({"ok": True})
        if parts[:2] == ["api", "datasets"]:
            return await self._api(request, parts[2:], method)
        return hub_error(404, None, "Not Found")

    async def _api(self, request: web.Request, parts: list[str], method: str) -> web.Response:
        ctx = self.ctx
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


class AccessLog(AbstractAccessLogger):
    """One line per request: client, request line, status, body bytes, range, time."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        sent = response.sent if isinstance(response, FdResponse) else response.body_length
        rng = request.headers.get("Range")
        self.logger.info('%s "%s %s" %d %d %s%.1fms', request.remote, request.method,
                         printable(request.raw_path, 2000), response.status, sent,
                         f"range={printable(rng, 100)} " if rng else "", time * 1e3)


def create_app(**options: Any) -> web.Application:
    """The server for every dataset under ``root`` (``root/<org>/<name>/``, see ``repo.Library``);
    ``options`` are the fields of :class:`ServeConfig` (``root`` required), defaults there."""
    config = ServeConfig(**options)
    hashes = HashCache()
    if config.hash_cache is not None:
        hashes.load(Path(config.hash_cache))
    ctx = ServerContext(open_library(config.root, config.storage_options, hashes),
                        AccessPolicy.from_file(config.tokens), config)
    app = web.Application(client_max_size=config.max_body,
                          handler_args={"max_line_size": config.max_header_bytes, "max_headers": 2 * config.max_headers,
                                        "max_field_size": config.max_header_bytes})
    app[CTX] = ctx
    app.router.add_route("*", r"/{path:[\s\S]*}", Handler(ctx).__call__)  # "." would miss a %0a
    return app


def runner_of(app: web.Application, *, keep_alive_s: float, graceful_s: float,
              access_log: bool) -> web.AppRunner:
    """The runner ``cifar5m serve`` (and the tests) serve ``app`` with."""
    return web.AppRunner(app, access_log_class=AccessLog, keepalive_timeout=keep_alive_s,
                         shutdown_timeout=graceful_s, handle_signals=False,
                         access_log=logging.getLogger("dataset_server.access") if access_log else None)
