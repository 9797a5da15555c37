"""``HEAD``/``GET /datasets/{org}/{name}/resolve/{rev}/{path}``: the file downloads.

Every answer carries what ``huggingface_hub.get_hf_file_metadata`` needs: the commit
(``X-Repo-Commit``), the content hash as ETag (it names the blob in the client's
cache) and the real ``Content-Length`` (a HEAD with length 0 would make the client
keep an empty file). Bodies are never compressed: sizes and ranges are of the file.

Conditional requests follow RFC 9110 section 13: ``If-Match`` (strong comparison, 412
when no tag matches) before ``If-None-Match`` (weak comparison, 304), and ``If-Range``
(an entity tag compared strongly, or the exact ``Last-Modified`` date) makes a ``Range``
apply only to the same file: otherwise the whole current file is sent (200).

A range that stops before the end of its file is read without the kernel's read-ahead
(``posix_fadvise(POSIX_FADV_RANDOM)`` on the request's own descriptor): on a cold page
cache, read-ahead (``read_ahead_kb``, 8 MB on some machines) made the streaming client's
many small ranges cost 2.4x (ideal world) and 10x (real world) the bytes they asked for.
Whole files and ranges to the end (resumed downloads) keep the sequential read-ahead.
Several ranges in one request (a scattered subset) come back as one ``multipart/byteranges``
body, read by ``pread`` in a thread.
"""

from __future__ import annotations

import asyncio
import functools
import mimetypes
import os
from email.utils import formatdate

from aiohttp import web

from cifar5m.dataset_server.context import ServerContext, lookup, state_at
from cifar5m.dataset_server.ranges import ByteRange, RangeNotSatisfiable, parse_range, parse_ranges
from cifar5m.dataset_server.repo import DatasetRepo, RepoFile, RepoState
from cifar5m.dataset_server.responses import REPO_COMMIT, FdResponse, hub_error

_TYPES = {".tar": "application/x-tar", ".parquet": "application/vnd.apache.parquet",
          ".md": "text/markdown; charset=utf-8", ".json": "application/json"}
# O_NOFOLLOW: a file swapped for a symlink after the last scan is refused, not followed.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_FADVISE = getattr(os, "posix_fadvise", None)  # Linux, BSD; not macOS or Windows


@functools.lru_cache(maxsize=8192)  # per file name: the same few names are asked for again and again
def _content_type(name: str) -> str:
    suffix = os.path.splitext(name)[1]
    return _TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


@functools.lru_cache(maxsize=8192)  # per file version; formatdate is ~4 us of a ~24 us HEAD
def _http_date(mtime_ns: int) -> str:
    return formatdate(mtime_ns / 1e9, usegmt=True)


def file_headers(state: RepoState, f: RepoFile) -> dict[str, str]:
    return {
        REPO_COMMIT: state.sha,
        # Quoted like the Hub's; the client strips quotes and a W/ prefix.
        "ETag": f'"{f.sha256}"',
        "Accept-Ranges": "bytes",
        "Content-Type": _content_type(f.name),
        "Last-Modified": _http_date(f.mtime_ns),
        # "main" moves, a commit sha does not: only the latter may be cached for long.
        "Cache-Control": "no-cache",
    }


async def _open(ctx: ServerContext, repo: DatasetRepo, revision: str, path: str
                ) -> tuple[RepoState, RepoFile | None, int | None]:
    """State, entry and an open fd whose file is exactly the entry (re-scanning once)."""
    for attempt in range(2):
        state = await state_at(repo, revision, max_age=ctx.config.scan_max_age if attempt == 0 else 0.0, ctx=ctx)
        entry = state.files.get(path)
        if entry is None:
            return state, None, None
        try:
            fd = os.open(entry.path, _OPEN_FLAGS)
        except OSError:
            continue  # gone or replaced since the scan: look again
        if entry.matches(os.fstat(fd)):
            return state, entry, fd
        os.close(fd)  # changed since the scan: re-scan, so ETag and commit are of these bytes
    return state, None, None


def _tags(header: str) -> list[str]:
    """The entity tags of an ``If-Match`` / ``If-None-Match`` list (``*`` kept as is)."""
    return [t.strip() for t in header.split(",") if t.strip()]


def _weak_match(header: str, etag: str) -> bool:
    return any(t == "*" or t.removeprefix("W/") == etag for t in _tags(header))


def _strong_match(header: str, etag: str) -> bool:
    return any(t in ("*", etag) for t in _tags(header))  # a W/ tag never matches strongly


def _range_applies(request: web.BaseRequest, headers: dict[str, str]) -> bool:
    """Whether ``If-Range`` (if any) names this very file: an ETag or its exact date."""
    if_range = request.headers.get("If-Range")
    if if_range is None:
        return True
    if_range = if_range.strip()
    if if_range.startswith(('"', "W/")):
        return if_range == headers["ETag"]
    return if_range == headers["Last-Modified"]


def _multipart(fd: int, ranges: list[ByteRange], content_type: str, boundary: str) -> bytes:
    """The ``multipart/byteranges`` body of ``ranges`` of ``fd`` (then closed)."""
    try:
        out = []
        for r in ranges:
            out.append(f"\r\n--{boundary}\r\nContent-Type: {content_type}\r\n"
                       f"Content-Range: {r.content_range}\r\n\r\n".encode())
            out.append(os.pread(fd, r.end - r.start, r.start))
        out.append(f"\r\n--{boundary}--\r\n".encode())
        return b"".join(out)
    finally:
        os.close(fd)


async def _multipart_response(fd: int, ranges: list[ByteRange], headers: dict[str, str]) -> web.Response:
    boundary = os.urandom(12).hex()
    if _FADVISE is not None:
        _FADVISE(fd, 0, 0, os.POSIX_FADV_RANDOM)  # scattered samples: no read-ahead around each
    body = await asyncio.to_thread(_multipart, fd, ranges, headers["Content-Type"], boundary)
    headers = {**headers, "Content-Type": f"multipart/byteranges; boundary={boundary}"}
    return web.Response(status=206, body=body, headers=headers)


async def resolve(ctx: ServerContext, request: web.BaseRequest, org: str, name: str, revision: str,
                  path: str) -> web.StreamResponse:
    repo = lookup(ctx, request, org, name, files=True)
    state, entry, fd = await _open(ctx, repo, revision, path)
    if entry is None or fd is None:
        return hub_error(404, "EntryNotFound",
                         f"{path} does not exist in dataset {repo.repo_id} at {state.sha}",
                         commit=state.sha)
    headers = file_headers(state, entry)
    etag = headers["ETag"]
    if_match = request.headers.get("If-Match")
    if if_match is not None and not _strong_match(if_match, etag):
        os.close(fd)
        return hub_error(412, None, f"{path} has ETag {etag}, not the one of If-Match",
                         headers={REPO_COMMIT: state.sha, "ETag": etag})
    inm = request.headers.get("If-None-Match")
    if inm is not None and _weak_match(inm, etag):
        os.close(fd)
        return web.Response(status=304, headers=headers)
    header = request.headers.get("Range") if _range_applies(request, headers) else None
    try:
        ranges = parse_ranges(header, entry.size)
        rng = parse_range(header, entry.size) if ranges is None else None
    except RangeNotSatisfiable as exc:
        os.close(fd)
        keep = {k: headers[k] for k in (REPO_COMMIT, "ETag", "Accept-Ranges")}
        return hub_error(416, None, f"range not satisfiable: {path} has {entry.size} bytes",
                         headers={**keep, "Content-Range": exc.content_range})
    if ranges is not None:
        return await _multipart_response(fd, ranges, headers)
    if rng is None:
        return FdResponse(fd, 0, entry.size, status=200, headers=headers)
    headers["Content-Range"] = rng.content_range
    if rng.end < entry.size and _FADVISE is not None:
        _FADVISE(fd, 0, 0, os.POSIX_FADV_RANDOM)  # only this descriptor: no read-ahead past the range
    return FdResponse(fd, rng.start, rng.end, status=206, headers=headers)
