"""The dataset pages for people: ``/`` lists the datasets, ``/datasets/<org>/<name>`` shows one.

Plain HTML and CSS from this server (no script, no CDN): the card's text, counts per
split, a class histogram, real samples per class, provenance, the files with sizes and
sha256, and copy-paste snippets with this server's URL. The token rules are those of
the API: a private dataset is not found without its token, a gated one shows its
description but not its samples. Samples are read through the index (a handful of
byte ranges, not whole shards) and drawn server-side as one PNG per class, kept per
commit; the page of a 60k dataset renders in tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import html
import io
import itertools
import json
import logging
import os
import threading

import numpy as np
import pyarrow.compute as pc
from aiohttp import web
from PIL import Image

from cifar5m.dataset_server.auth import Access
from cifar5m.dataset_server.context import MAIN, ServerContext, access_of, lookup, state_at, visible
from cifar5m.dataset_server.repo import Library, RepoState
from cifar5m.dataset_server.responses import Denied, hub_error
from cifar5m.shards.codec import decode_image
from cifar5m.shards.format import INDEX_NAME
from cifar5m.shards.index import read_index

log = logging.getLogger("dataset_server")
PER_CLASS = 8  # samples per class in the grid
_WARM_MAX = 64  # datasets whose class counts and sample PNGs are made at start
_view_lock = threading.Lock()
_INDEX_COLUMNS = ["split", "shard", "position", "image_offset", "image_size", "label"]

_CSS = """body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1000px;padding:1em 1.5em;color:#222}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.15em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
code,pre{font:13px ui-monospace,monospace;background:#f5f5f5}pre{padding:.6em;overflow-x:auto;white-space:pre-wrap}
.num{text-align:right}.bar{background:#4a7bd0;height:12px}.tag{background:#eee;border-radius:3px;padding:0 6px}
.grid img{image-rendering:pixelated;width:528px;height:64px;display:block;margin:2px 0}
.grid td{vertical-align:middle}.sha{font-size:12px;color:#666}a{color:#2456a8}"""


def _page_response(title: str, body: str, status: int = 200) -> web.Response:
    text = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<meta name=viewport content='width=device-width'><style>{_CSS}</style></head><body>{body}</body></html>")
    return web.Response(text=text, status=status, content_type="text/html", headers={"Cache-Control": "no-cache"})


async def page(ctx: ServerContext, request: web.Request, org: str | None = None,
               name: str | None = None) -> web.Response:
    """``/`` (org and name None) or the page of dataset ``org/name``."""
    if org is None or name is None:
        return _page_response("cifar5m datasets", await _listing(ctx, request))
    try:
        repo, access = access_of(ctx, request, org, name)
        state = await state_at(repo, MAIN)
    except Denied as denied:
        message = denied.response.headers.get("X-Error-Message", "not found")
        return _page_response("not found", f"<h1>{denied.response.status}</h1><p>{html.escape(message)}</p>"
                              "<p><a href='/'>all datasets</a></p>", denied.response.status)
    body = await asyncio.to_thread(_dataset_body, request, state, access)
    return _page_response(state.repo_id, body)


async def _listing(ctx: ServerContext, request: web.Request) -> str:
    rows = []
    for repo, access in visible(ctx, request):
        repo_id = repo.repo_id
        try:
            state = await state_at(repo, MAIN, max_age=60.0, ctx=ctx)
        except Denied:
            continue
        manifest = state.manifest
        counts = ", ".join(f"{t['samples']:,} {split}" for split, t in manifest.totals().items())
        badge = " <span class=tag>gated</span>" if access is Access.METADATA else ""
        rows.append(f"<tr><td><a href='/datasets/{repo_id}'>{html.escape(repo_id)}</a>{badge}</td>"
                    f"<td>{counts}</td><td>{manifest.image_format}</td></tr>")
    table = "".join(rows) or "<tr><td>no datasets visible (private ones need a token)</td></tr>"
    return f"<h1>Datasets</h1><table><tr><th>dataset</th><th>samples</th><th>format</th></tr>{table}</table>"


def _dataset_body(request: web.Request, state: RepoState, access: Access) -> str:
    manifest = state.manifest
    e = html.escape
    origin = f"{request.scheme}://{request.host}"
    parts = [f"<p><a href='/'>all datasets</a></p><h1>{e(state.repo_id)}</h1>",
             f"<p class=sha>commit {state.sha} &middot; {manifest.image_format} images &middot; "
             f"{len(manifest.class_names)} classes</p>"]
    totals = manifest.totals()
    parts.append("<h2>Splits</h2><table><tr><th>split</th><th class=num>samples</th><th class=num>shards</th>"
                 "<th class=num>MB</th></tr>" + "".join(
                     f"<tr><td>{e(s)}</td><td class=num>{t['samples']:,}</td><td class=num>{t['shards']}</td>"
                     f"<td class=num>{t['bytes'] / 1e6:,.1f}</td></tr>" for s, t in totals.items()) + "</table>")
    parts.append(_histogram(state))
    if access is Access.FULL:
        parts.append("<h2>Samples</h2><table class=grid>" + "".join(
            f"<tr><td>{e(c)}</td><td><img alt='{e(c)} samples' width=528 height=64 "
            f"src='/datasets/{state.repo_id}/samples/{k}.png?rev={state.sha}'></td></tr>"
            for k, c in enumerate(manifest.class_names)) + "</table>")
    else:
        parts.append("<h2>Samples</h2><p>This dataset is gated: its files, samples included, need a token.</p>")
    parts.append(_snippets(origin, state.repo_id))
    if manifest.provenance:
        rows = "".join(f"<tr><td>{e(str(k))}</td><td><code>{e(_short(v))}</code></td></tr>"
                       for k, v in manifest.provenance.items())
        parts.append(f"<h2>Provenance</h2><table>{rows}</table>")
    if state.card_text:
        parts.append(f"<h2>Dataset card</h2><pre>{e(state.card_text[:200_000])}</pre>")
    files = "".join(f"<tr><td><a href='/datasets/{state.repo_id}/resolve/{state.sha}/{f.name}'>{e(f.name)}</a></td>"
                    f"<td class=num>{f.size:,}</td><td class=sha>{f.sha256}</td></tr>" for f in state.files.values())
    parts.append(f"<h2>Files</h2><table><tr><th>file</th><th class=num>bytes</th><th>sha256</th></tr>{files}</table>")
    return "".join(parts)


def _short(value: object, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + " ..."


def _view(state: RepoState) -> tuple[dict[str, np.ndarray], list[bytes]]:
    """``_make_view(state)``, made once per commit and kept with it, beside its API answers
    (under a lock: one reader at a time)."""
    with _view_lock:
        view = state.answers.get("view")
        if view is None:
            view = state.answers["view"] = _make_view(state)
        return view


def _histogram(state: RepoState) -> str:
    counts = _view(state)[0]
    if not counts:
        return ""
    top = max(int(c.max()) for c in counts.values()) or 1
    head = "".join(f"<th class=num>{html.escape(s)}</th>" for s in counts)
    first = next(iter(counts.values()))  # the bars: the first split's counts
    rows = []
    for k, cls in enumerate(state.manifest.class_names):
        cells = "".join(f"<td class=num>{int(c[k]):,}</td>" for c in counts.values())
        width = 300 * int(first[k]) // top
        rows.append(f"<tr><td>{html.escape(cls)}</td>{cells}<td><div class=bar style='width:{width}px'></div></td></tr>")
    return f"<h2>Classes</h2><table><tr><th>class</th>{head}<th></th></tr>{''.join(rows)}</table>"


def _snippets(origin: str, repo_id: str) -> str:
    name = repo_id.split("/", 1)[1]
    code = {
        "cifar5m download": f"cifar5m download {repo_id} --endpoint {origin} --local-dir {name}",
        "huggingface_hub": (f"HF_ENDPOINT={origin} python -c \"from huggingface_hub import snapshot_download; "
                            f"print(snapshot_download('{repo_id}', repo_type='dataset'))\""),
        "datasets": (f"HF_ENDPOINT={origin} python -c \"import datasets; "
                     f"print(next(iter(datasets.load_dataset('{repo_id}', split='train', streaming=True))))\""),
        "cifar5m stream": f"cifar5m stream {origin}/datasets/{repo_id}/resolve/main --batch-size 256",
    }
    return "<h2>Use it</h2>" + "".join(f"<p>{html.escape(k)}</p><pre>{html.escape(v)}</pre>" for k, v in code.items())


def warm(library: Library) -> None:
    """Class counts and sample PNGs of every dataset, made before a first visitor waits for
    them (the first parquet read of a process alone takes ~0.3 s)."""
    for repo_id, state in itertools.islice(library.scan_all(), _WARM_MAX):
        if isinstance(state, Exception):  # unreadable: its page says why when asked
            log.info("no viewer warm-up for %s: %s", repo_id, state)
            continue
        try:
            _view(state)
        except (OSError, ValueError) as exc:
            log.info("no viewer warm-up for %s: %s", repo_id, exc)


async def samples(ctx: ServerContext, request: web.Request, org: str, name: str, file: str) -> web.Response:
    """``/datasets/<org>/<name>/samples/<class>.png``: a strip of the class's first samples."""
    repo = lookup(ctx, request, org, name, files=True)
    state = await state_at(repo, MAIN, max_age=ctx.config.scan_max_age, ctx=ctx)
    stem, _, ext = file.partition(".")
    not_found = ext != "png" or not stem.isdigit()  # no index read or decoding for these
    pngs = [] if not_found else (await asyncio.to_thread(_view, state))[1]
    if not_found or int(stem) >= len(pngs):
        return hub_error(404, "EntryNotFound", f"no samples image {file} in dataset {state.repo_id}")
    return web.Response(body=pngs[int(stem)], content_type="image/png",
                        headers={"Cache-Control": "max-age=3600" if request.query.get("rev") == state.sha
                                 else "no-cache", "ETag": f'"{state.sha}-{stem}"'})


def _make_view(state: RepoState) -> tuple[dict[str, np.ndarray], list[bytes]]:
    """Samples per class label and split, and one PNG per class of its first ``PER_CLASS``
    train samples (the first split without train), each read by its byte range from a
    served shard and decoded: one read of the index for both."""
    manifest = state.manifest
    blank = np.full((32, PER_CLASS * 33, 3), 255, np.uint8)
    if INDEX_NAME not in state.files:
        return {}, [_png(blank) for _ in manifest.class_names]
    path = state.files[INDEX_NAME].path
    table = read_index(path, columns=_INDEX_COLUMNS, filesystem=state.fs, where=f"{state.repo_id}/{INDEX_NAME}")
    n = len(manifest.class_names)  # per split in the manifest's order (train first), one per class
    counts = {s: np.bincount(table.filter(pc.equal(table["split"], s))["label"].to_numpy(),
                             minlength=n)[:n] for s in manifest.splits}
    split = "train" if "train" in manifest.splits else manifest.splits[0]
    rows = table.filter(pc.equal(table["split"], split)).sort_by("position")
    labels = rows["label"].to_numpy()
    picks = []  # (class, place in its strip, path, offset, size) of the samples shown
    for k in range(n):
        for j, i in enumerate(np.flatnonzero(labels == k)[:PER_CLASS].tolist()):
            shard = state.files.get(rows["shard"][i].as_py())  # only files the scan let through
            if shard is not None:
                picks.append((k, j, shard.path, rows["image_offset"][i].as_py(), rows["image_size"][i].as_py()))
    canvases = [blank.copy() for _ in range(n)]
    for (k, j, *_), data in zip(picks, _read(state, [p[2:] for p in picks]), strict=True):
        canvases[k][:, j * 33:j * 33 + 32] = decode_image(data, manifest.image_format)
    return counts, [_png(c) for c in canvases]


def _read(state: RepoState, ranges: list[tuple[str, int, int]]) -> list[bytes]:
    """The bytes of each ``(path, offset, size)`` of served files: from this machine's disk, or
    from the store all at once."""
    if state.fs is not None:
        return state.fs.cat_ranges([p for p, _, _ in ranges], [o for _, o, _ in ranges],
                                   [o + n for _, o, n in ranges])
    out = []
    for path, offset, size in ranges:
        with open(path, "rb") as f:
            out.append(os.pread(f.fileno(), size, offset))
    return out


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()
