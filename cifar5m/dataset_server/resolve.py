"""``HEAD``/``GET /datasets/{org}/{name}/resolve/{rev}/{path}``: the file downloads.

Every answer carries what ``huggingface_hub.get_hf_file_metadata`` needs: the commit
(``X-Repo-Commit``), the content hash as ETag (it names the blob in the client's
cache) and the real ``Content-Length`` (a HEAD with length 0 would make the client
keep an empty file). Bodies are never compressed: sizes and ranges are of the file.

Conditional requests follow RFC 9110 section 13: ``If-Match`` (strong comparison, 412
when no tag matches) or, without it, ``If-Unmodified-Since`` (412 for a file modified after
that date), before ``If-None-Match`` (weak comparison, 304), and ``If-Range``
(an entity tag compared strongly, or the exact ``Last-Modified`` date) makes a ``Range``
apply only to the same file: otherwise the whole current file is sent (200).

A range that stops before the end of its file is read without the kernel's read-ahead
(``posix_fadvise(POSIX_FADV_RANDOM)`` on the request's own descriptor): on a cold page
cache, read-ahead (``read_ahead_kb``, 8 MB on some machines) made the streaming client's
many small ranges cost 2.4x (ideal world) and 10x (real world) the bytes they asked for.
Whole files and ranges to the end (resumed downloads) keep the sequential read-ahead.

Two other ways send the bytes (docs/serving.md), after the same checks: with
``--accel-redirect`` a GET is answered with ``X-Accel-Redirect`` for nginx to send the file,
and a root on an object store answers with a redirect to a signed URL of the object.
Several ranges in one request (a scattered subset) come back as one ``multipart/byteranges``
body, read by ``pread`` in a thread.
"""

from __future__ import annotations

import asyncio
import functools
import os
import stat
from email.utils import formatdate, parsedate_to_datetime

from aiohttp import web

from cifar5m.core.errors import StoreError
from cifar5m.dataset_server.context import ServerContext, lookup, state_at
from cifar5m.dataset_server.ranges import ByteRange, RangeNotSatisfiable, parse_range, parse_ranges
from cifar5m.dataset_server.repo import DatasetRepo, RepoFile, RepoState
from cifar5m.dataset_server.responses import REPO_COMMIT, FdResponse, hub_error
from cifar5m.dataset_server.store_root import StoreRepo

# The types files go out as: these, and application/octet-stream for anything else, which a
# browser then saves instead of rendering (an x.html or x.svg a manifest lists is no page of
# this server's origin).
_TYPES = {".tar": "application/x-tar", ".parquet": "application/vnd.apache.parquet",
          ".md": "text/markdown; charset=utf-8", ".json": "application/json"}
_DOWNLOAD = "application/octet-stream"
# O_NOFOLLOW: a file swapped for a symlink after the last scan is refused, not followed.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_FADVISE = getattr(os, "posix_fadvise", None)  # Linux, BSD; not macOS or Windows


@functools.lru_cache(maxsize=8192)  # per file name: the same few names are asked for again and again
def _content_type(name: str) -> str:
    return _TYPES.get(os.path.splitext(name)[1], _DOWNLOAD)


@functools.lru_cache(maxsize=8192)  # per file version; formatdate is ~4 us of a ~24 us HEAD
def _http_date(mtime_ns: int) -> str:
    return formatdate(mtime_ns / 1e9, usegmt=True)


def file_headers(state: RepoState, f: RepoFile) -> dict[str, str]:
    headers = {
        REPO_COMMIT: state.sha,
        # Quoted like the Hub's; the client strips quotes and a W/ prefix.
        "ETag": f'"{f.sha256}"',
        "Accept-Ranges": "bytes",
        "Content-Type": _content_type(f.name),
        "Last-Modified": _http_date(f.mtime_ns),
        # "main" moves, a commit sha does not: only the latter may be cached for long.
        "Cache-Control": "no-cache",
    }
    if headers["Content-Type"] == _DOWNLOAD:
        headers["Content-Disposition"] = "attachment"
    return headers


def _modified_since(request: web.BaseRequest, f: RepoFile) -> bool:
    """Whether ``If-Unmodified-Since`` (a valid date; anything else is ignored) is older than
    ``f``'s Last-Modified, in whole seconds as that header states it."""
    try:
        date = parsedate_to_datetime(request.headers.get("If-Unmodified-Since", ""))
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    return date.tzinfo is not None and f.mtime_ns // 1_000_000_000 > date.timestamp()


async def _open(ctx: ServerContext, repo: DatasetRepo, revision: str, path: str, *, fd: bool = True
                ) -> tuple[RepoState, RepoFile | None, int | None]:
    """State, entry and an open fd whose file is exactly the entry (re-scanning once); with
    ``fd`` False the file is only checked (lstat: nginx opens it) and no fd comes back."""
    for attempt in range(2):
        state = await state_at(repo, revision, max_age=ctx.config.scan_max_age if attempt == 0 else 0.0, ctx=ctx)
        entry = state.files.get(path)
        if entry is None:
            return state, None, None
        try:
            opened = os.open(entry.path, _OPEN_FLAGS) if fd else -1
            st = os.fstat(opened) if fd else os.lstat(entry.path)
        except OSError:
            continue  # gone or replaced since the scan: look again
        if entry.matches(st) and stat.S_ISREG(st.st_mode):
            return state, entry, opened if fd else None
        if fd:
            os.close(opened)  # changed since the scan: re-scan, so ETag and commit are of these bytes
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


def conditions(request: web.BaseRequest, path: str, f: RepoFile,
               headers: dict[str, str]) -> web.Response | ByteRange | list[ByteRange] | None:
    """What the request's preconditions and range call for: a 412, 304 or 416 answer, else
    the range or ranges to send (None: the whole file)."""
    etag = headers["ETag"]
    if_match = request.headers.get("If-Match")
    if if_match is not None and not _strong_match(if_match, etag):
        return hub_error(412, None, f"{path} has ETag {etag}, not the one of If-Match",
                         headers={REPO_COMMIT: headers[REPO_COMMIT], "ETag": etag})
    if if_match is None and _modified_since(request, f):  # RFC 9110 13.1.4: only without If-Match
        return hub_error(412, None, f"{path} was modified at {headers['Last-Modified']}, after "
                         "If-Unmodified-Since", headers={REPO_COMMIT: headers[REPO_COMMIT], "ETag": etag})
    inm = request.headers.get("If-None-Match")
    if inm is not None and _weak_match(inm, etag):
        return web.Response(status=304, headers=headers)
    header = request.headers.get("Range") if _range_applies(request, headers) else None
    try:
        ranges = parse_ranges(header, f.size)
        return ranges if ranges is not None else parse_range(header, f.size)
    except RangeNotSatisfiable as exc:
        keep = {k: headers[k] for k in (REPO_COMMIT, "ETag", "Accept-Ranges")}
        return hub_error(416, None, f"range not satisfiable: {path} has {f.size} bytes",
                         headers={**keep, "Content-Range": exc.content_range})


def missing(repo_id: str, state: RepoState, path: str) -> web.Response:
    return hub_error(404, "EntryNotFound", f"{path} does not exist in dataset {repo_id} at {state.sha}",
                     commit=state.sha)


async def resolve(ctx: ServerContext, request: web.BaseRequest, org: str, name: str, revision: str,
                  path: str) -> web.StreamResponse:
    repo = lookup(ctx, request, org, name, files=True)
    if isinstance(repo, StoreRepo):
        return await store_file(ctx, request, repo, revision, path)
    accel = (ctx.config.accel_redirect is not None and request.method == "GET" and nginx_may_answer(request)
             and "," not in request.headers.get("Range", ""))  # several ranges: answered here
    state, entry, fd = await _open(ctx, repo, revision, path, fd=not accel)
    if entry is None:
        return missing(repo.repo_id, state, path)
    headers = file_headers(state, entry)
    answer = conditions(request, path, entry, headers)
    if fd is None:  # nginx opens the same path next (docs/serving.md: the instant between)
        return answer if isinstance(answer, web.Response) else \
            accel_redirect(ctx.config.accel_redirect, str(ctx.config.root), entry, headers)
    if isinstance(answer, web.Response):
        os.close(fd)
        return answer
    if isinstance(answer, list):
        return await _multipart_response(fd, answer, headers)
    if answer is None:
        return FdResponse(fd, 0, entry.size, status=200, headers=headers)
    headers["Content-Range"] = answer.content_range
    if answer.end < entry.size and _FADVISE is not None:
        _FADVISE(fd, 0, 0, os.POSIX_FADV_RANDOM)  # only this descriptor: no read-ahead past the range
    return FdResponse(fd, answer.start, answer.end, status=206, headers=headers)


def nginx_may_answer(request: web.BaseRequest) -> bool:
    """Whether nginx, sending the file, would answer as this server does: it checks
    ``If-Match`` and ``If-Unmodified-Since`` against its own ETag and date (not the sha256),
    so those rare requests are answered here."""
    return "If-Match" not in request.headers and "If-Unmodified-Since" not in request.headers


@functools.lru_cache(maxsize=8192)  # per file path: the same few are asked for again and again
def _under(root: str, path: str) -> str:
    """``path`` relative to the serve root as given (a dataset folder itself, or the folder of
    several): what nginx's location aliases."""
    return os.path.relpath(path, os.path.realpath(root))


def accel_redirect(prefix: str, root: str, f: RepoFile, headers: dict[str, str]) -> web.Response:
    """The answer that has nginx send ``f`` (its path under serve root ``root``, behind
    ``prefix``), with the headers nginx does not set itself (docs/serving.md)."""
    sent = {k: v for k, v in headers.items() if k != "Accept-Ranges"}  # nginx says it itself
    return web.Response(status=200, headers={**sent, "X-Accel-Redirect": prefix + _under(root, f.path)})


async def store_file(ctx: ServerContext, request: web.BaseRequest, repo: StoreRepo, revision: str,
                     path: str) -> web.StreamResponse:
    """A file of an object-store dataset: small git files from memory, the others by a
    redirect to a signed URL of the very object version the commit was made from (as the
    Hub sends LFS files to its CDN); a dataset changed meanwhile is scanned again."""
    for attempt in range(2):
        state = await state_at(repo, revision, max_age=ctx.config.scan_max_age if attempt == 0 else 0.0, ctx=ctx)
        entry = state.files.get(path)
        if entry is None:
            break
        headers = file_headers(state, entry)
        answer = conditions(request, path, entry, headers)
        if isinstance(answer, web.Response):
            return answer
        if isinstance(answer, list):  # several ranges of a small file: all of it (RFC 9110 allows)
            answer = None
        if not entry.lfs:
            body = repo.body(entry)
            if body is None:
                continue  # read again by a scan since: look again
            if answer is None:
                return web.Response(body=body, headers=headers)
            return web.Response(body=body[answer.start:answer.end], status=206,
                                headers={**headers, "Content-Range": answer.content_range})
        try:
            url = await asyncio.to_thread(repo.signed_url, entry, ctx.config.url_expiry_s)
        except StoreError:
            return hub_error(503, None, f"dataset {repo.repo_id}: its store did not answer; retry later")
        if url is not None:
            return web.Response(status=302, headers={
                **headers, "Location": url, "X-Linked-Etag": headers["ETag"], "X-Linked-Size": str(entry.size)})
    return missing(repo.repo_id, state, path)
