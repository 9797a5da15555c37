"""The JSON half of the Hub API: dataset info, tree listings, paths-info, dataset list.

Field names and shapes follow huggingface_hub 2.4's parsers (``hf_api.py``:
``DatasetInfo``, ``RepoFile``/``RepoFolder``, ``_iter_repo_tree_pages``,
``get_paths_info``) and the 0.x clients, which take file names from ``siblings``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from urllib.parse import parse_qs

from aiohttp import web

from cifar5m.dataset_server.context import ServerContext, lookup, state_at, visible
from cifar5m.dataset_server.repo import RepoFile, RepoState, lfs_pointer
from cifar5m.dataset_server.responses import REPO_COMMIT, Denied, hub_error

# Pagination cursors are plain offsets into the listing (sorted, stable per commit).
# A dataset is flat, so `recursive=true|false` (or True/False from 0.x clients) lists
# the same files, and `expand` adds nothing the clients need.
_MAX_PATHS = 10_000


def _json(body: bytes, headers: dict[str, str]) -> web.Response:
    return web.Response(body=body, content_type="application/json", charset="utf-8", headers=headers)


def _answer(state: RepoState, key: tuple, make) -> bytes:
    """``make()`` encoded once per commit: an unchanged dataset answers from ``state.answers``.

    The keys come from a bounded set (one per kind, one per file), never from request text
    that is not a file of this commit. A state belongs to one app's ``Library``, whose access
    policy and page size are fixed, so neither is part of a key."""
    body = state.answers.get(key)
    if body is None:
        body = state.answers[key] = json.dumps(make()).encode()
    return body


def _entries(state: RepoState, files: list[RepoFile]) -> bytes:
    """The JSON list of ``files``' entries, each encoded once per commit."""
    return b"[" + b", ".join(_answer(state, ("entry", f.name), lambda f=f: file_entry(f)) for f in files) + b"]"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def file_entry(f: RepoFile) -> dict:
    """A tree / paths-info entry, as the Hub returns it for a file."""
    entry: dict = {"type": "file", "oid": f.oid, "size": f.size, "path": f.name}
    return {**entry, "lfs": _lfs(f, "oid")} if f.lfs else entry


def sibling(f: RepoFile) -> dict:
    out: dict = {"rfilename": f.name, "size": f.size, "blobId": f.oid}
    return {**out, "lfs": _lfs(f, "sha256")} if f.lfs else out


def _lfs(f: RepoFile, key: str) -> dict:
    # Siblings name the LFS hash "sha256", tree entries "oid" (DatasetInfo vs RepoFile).
    return {key: f.sha256, "size": f.size, "pointerSize": len(lfs_pointer(f.sha256, f.size))}


def _summary(ctx: ServerContext, repo_id: str) -> dict:
    """What the dataset list and the dataset info both say of ``repo_id``."""
    return {"id": repo_id, "author": repo_id.split("/", 1)[0], "private": ctx.policy.private(repo_id),
            "gated": "manual" if ctx.policy.gated(repo_id) else False}


def info_json(ctx: ServerContext, state: RepoState) -> dict:
    card = state.card_data
    return {
        **_summary(ctx, state.repo_id),
        "_id": state.sha[:24],
        "sha": state.sha,
        "lastModified": _iso(state.last_modified),
        "createdAt": _iso(min(f.mtime_ns for f in state.files.values()) / 1e9),
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [str(t) for t in card.get("tags", []) if isinstance(t, str)],
        "cardData": card,
        "siblings": [sibling(f) for f in state.files.values()],
        "usedStorage": sum(f.size for f in state.files.values()),
    }


async def dataset_info(ctx: ServerContext, request: web.Request, org: str, name: str,
                       revision: str) -> web.Response:
    repo = lookup(ctx, request, org, name, files=False)
    state = await state_at(repo, revision)
    return _json(_answer(state, ("info",), lambda: info_json(ctx, state)), {REPO_COMMIT: state.sha})


async def tree(ctx: ServerContext, request: web.Request, org: str, name: str, revision: str,
               path: str) -> web.Response:
    repo = lookup(ctx, request, org, name, files=False)
    state = await state_at(repo, revision)
    path = path.strip("/")
    if path in ("", "."):
        entries = list(state.files.values())  # flat repo: recursive or not, the same list
    elif path in state.files:
        entries = [state.files[path]]
    else:
        return hub_error(404, "EntryNotFound", f"{path} does not exist in dataset {state.repo_id}",
                         commit=state.sha)
    try:
        start = max(int(request.query.get("cursor", "0")), 0)
    except ValueError:
        return hub_error(400, None, "cursor must be an integer offset")
    size = ctx.config.page_size
    page = entries[start:start + size]
    headers = {REPO_COMMIT: state.sha}
    if start + size < len(entries):
        # Absolute, with every query parameter: the client fetches it verbatim.
        nxt = request.url.update_query(cursor=str(start + size))
        headers["Link"] = f'<{nxt}>; rel="next"'
    if start == 0 and path in ("", "."):  # the listing's first page (what every client asks)
        return _json(_answer(state, ("tree",), lambda: [file_entry(f) for f in page]), headers)
    return _json(_entries(state, page), headers)


async def read_body(request: web.Request) -> bytes:
    """The request body, refusing (413) anything over aiohttp's ``client_max_size`` (set to
    ``max_body``): a longer Content-Length before a byte is read (a client that claims 1 TB
    and sends nothing is not waited for), a longer body as ``read`` takes its bytes in."""
    limit = request.client_max_size
    try:
        if (request.content_length or 0) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Denied(hub_error(413, None, f"request body over {limit} bytes")) from None


def requested_paths(body: bytes, content_type: str) -> list[str]:
    """``paths`` of a paths-info body: form-encoded (what the clients send) or JSON."""
    if content_type.startswith("application/json"):
        doc = json.loads(body or b"{}")
        paths = doc.get("paths", []) if isinstance(doc, dict) else []
        return [p for p in paths if isinstance(p, str)][:_MAX_PATHS]
    form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=_MAX_PATHS + 10)
    return form.get("paths", [])[:_MAX_PATHS]


async def paths_info(ctx: ServerContext, request: web.Request, org: str, name: str,
                     revision: str) -> web.Response:
    repo = lookup(ctx, request, org, name, files=False)
    body = await read_body(request)
    state = await state_at(repo, revision)
    try:
        paths = requested_paths(body, request.headers.get("content-type", ""))
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to parse
        return hub_error(400, None, "paths-info body must be form-encoded 'paths=...' or JSON")
    # Paths that do not exist are left out, as on the Hub.
    found = [state.files[p.strip("/")] for p in paths if p.strip("/") in state.files]
    return _json(_entries(state, found), {REPO_COMMIT: state.sha})


async def list_datasets(ctx: ServerContext, request: web.Request) -> web.Response:
    """``GET /api/datasets``: the datasets this request may see (``list_datasets``)."""
    author = request.query.get("author")
    out = []
    for repo, _ in visible(ctx, request):
        state = repo.cached(60.0)
        if not author or repo.repo_id.split("/", 1)[0] == author:
            out.append({**_summary(ctx, repo.repo_id),
                        **({"sha": state.sha, "lastModified": _iso(state.last_modified)} if state else {})})
    return web.json_response(out)
