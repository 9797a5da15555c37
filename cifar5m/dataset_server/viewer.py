"""The dataset pages for people: ``/`` lists the datasets, ``/datasets/<org>/<name>`` shows one.

Plain HTML and CSS from this server (no script, no CDN): the card's text, counts per
split, a class histogram, real samples per class, provenance, the files with sizes and
sha256, and copy-paste snippets with this server's URL. Every page is built by ``html()``,
which escapes every value it fills in: no text of a manifest or card is markup. The token
rules are those of the API: a private dataset is not found without its token, a gated one
shows its description but neither its class counts nor its samples. Samples are read
through the index (a handful of byte ranges, not whole shards) and drawn server-side as one
PNG per class, kept per commit (so is a dataset's failure to give them: logged once); the
page of a 60k dataset renders in tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import os
import re
import threading
from collections.abc import Iterable
from html import escape
from typing import NamedTuple

import numpy as np
import pyarrow.compute as pc
from aiohttp import web
from PIL import Image

from cifar5m.dataset_server.auth import Access
from cifar5m.dataset_server.context import MAIN, ServerContext, access_of, lookup, state_at, visible
from cifar5m.dataset_server.repo import Library, RepoState
from cifar5m.dataset_server.responses import Denied, hub_error, printable
from cifar5m.shards.codec import decode_image
from cifar5m.shards.format import INDEX_NAME
from cifar5m.shards.index import read_index

log = logging.getLogger("dataset_server")
PER_CLASS = 8  # samples per class in the grid
_WARM_MAX = 64  # datasets whose class counts and sample PNGs are made at start
_view_lock = threading.Lock()
_INDEX_COLUMNS = ["split", "shard", "position", "image_offset", "image_size", "label"]
_CLASS = re.compile(r"[0-9]{1,6}")  # a class number in a strip's name (ASCII digits: '²' is no number)

_CSS = """body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1000px;padding:1em 1.5em;color:#222}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.15em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
code,pre{font:13px ui-monospace,monospace;background:#f5f5f5}pre{padding:.6em;overflow-x:auto;white-space:pre-wrap}
.num{text-align:right}.bar{background:#4a7bd0;height:12px}.tag{background:#eee;border-radius:3px;padding:0 6px}
.grid img{image-rendering:pixelated;width:528px;height:64px;display:block;margin:2px 0}
.grid td{vertical-align:middle}.sha{font-size:12px;color:#666}a{color:#2456a8}"""


class Html(str):
    """Markup made by ``html()``: put into another template as it is, never escaped again."""


def html(template: str, *values: object) -> Html:
    """The one way a page is built: ``template`` (markup written here) with its ``{}`` fields
    filled by ``values``, each escaped (quotes too) unless it is ``Html`` or a number."""
    return Html(template.format(*(v if isinstance(v, Html | int | float) else escape(str(v)) for v in values)))


def joined(parts: Iterable[Html]) -> Html:
    return Html("".join(html("{}", p) for p in parts))


def _page_response(title: str, body: Html, status: int = 200) -> web.Response:
    text = html("<!doctype html><html lang=en><head><meta charset=utf-8><title>{}</title>"
                "<meta name=viewport content='width=device-width'><style>{}</style></head><body>{}</body></html>",
                title, Html(_CSS), body)
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
        return _page_response("not found", html("<h1>{}</h1><p>{}</p><p><a href='/'>all datasets</a></p>",
                                                denied.response.status, message), denied.response.status)
    body = await asyncio.to_thread(_dataset_body, request, state, access)
    return _page_response(state.repo_id, body)


async def _listing(ctx: ServerContext, request: web.Request) -> Html:
    rows = []
    for repo, access in visible(ctx, request):
        try:
            state = await state_at(repo, MAIN, max_age=60.0, ctx=ctx)
        except Denied:
            continue
        manifest = state.manifest
        counts = ", ".join(f"{t['samples']:,} {split}" for split, t in manifest.totals().items())
        badge = Html(" <span class=tag>gated</span>" if access is Access.METADATA else "")
        rows.append(html("<tr><td><a href='/datasets/{}'>{}</a>{}</td><td>{}</td><td>{}</td></tr>",
                         repo.repo_id, repo.repo_id, badge, counts, manifest.image_format))
    table = joined(rows) or html("<tr><td>no datasets visible (private ones need a token)</td></tr>")
    return html("<h1>Datasets</h1><table><tr><th>dataset</th><th>samples</th><th>format</th></tr>{}</table>", table)


def _dataset_body(request: web.Request, state: RepoState, access: Access) -> Html:
    manifest = state.manifest
    origin = f"{request.scheme}://{request.host}"
    parts = [html("<p><a href='/'>all datasets</a></p><h1>{}</h1><p class=sha>commit {} &middot; {} images "
                  "&middot; {} classes</p>", state.repo_id, state.sha, manifest.image_format,
                  len(manifest.class_names)),
             html("<h2>Splits</h2><table><tr><th>split</th><th class=num>samples</th><th class=num>shards</th>"
                  "<th class=num>MB</th></tr>{}</table>", joined(
                      html("<tr><td>{}</td><td class=num>{:,}</td><td class=num>{}</td><td class=num>{:,.1f}</td></tr>",
                           s, t["samples"], t["shards"], t["bytes"] / 1e6) for s, t in manifest.totals().items()))]
    if access is not Access.FULL:  # its index (the class counts) and samples need a token, like its files
        parts.append(html("<h2>Samples</h2><p>This dataset is gated: its files, samples and class counts "
                          "included, need a token.</p>"))
    elif (view := _view(state)).problem:
        parts.append(html("<h2>Classes</h2><p>Class counts and samples cannot be shown: {}.</p>", view.problem))
    else:
        parts += [_histogram(state, view.counts), html("<h2>Samples</h2><table class=grid>{}</table>", joined(
            html("<tr><td>{}</td><td><img alt='{} samples' width=528 height=64 src='/datasets/{}/samples/{}.png"
                 "?rev={}'></td></tr>", c, c, state.repo_id, k, state.sha)
            for k, c in enumerate(manifest.class_names)))]
    parts.append(_snippets(origin, state.repo_id))
    if manifest.provenance:
        parts.append(html("<h2>Provenance</h2><table>{}</table>", joined(
            html("<tr><td>{}</td><td><code>{}</code></td></tr>", k, _short(v)) for k, v in manifest.provenance.items())))
    if state.card_text:
        parts.append(html("<h2>Dataset card</h2><pre>{}</pre>", state.card_text[:200_000]))
    files = joined(html("<tr><td><a href='/datasets/{}/resolve/{}/{}'>{}</a></td><td class=num>{:,}</td>"
                        "<td class=sha>{}</td></tr>", state.repo_id, state.sha, f.name, f.name, f.size, f.sha256)
                   for f in state.files.values())
    parts.append(html("<h2>Files</h2><table><tr><th>file</th><th class=num>bytes</th><th>sha256</th></tr>{}</table>",
                      files))
    return joined(parts)


def _short(value: object, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + " ..."


class View(NamedTuple):
    """What the page shows of a dataset's index: samples per split and class, one PNG strip per
    class; or, for a dataset whose index or samples cannot be read, why not."""

    counts: dict[str, np.ndarray]
    strips: list[bytes]
    problem: str | None = None


def _view(state: RepoState) -> View:
    """``_make_view(state)``, made once per commit and kept with it, beside its API answers
    (under a lock: one reader at a time). A damaged dataset is logged once per commit and
    kept as its problem: its page says so and its strips answer 501, never a traceback."""
    with _view_lock:
        view = state.answers.get("view")
        if view is None:
            try:
                view = _make_view(state)
            except Exception as exc:  # whatever its bytes raise (pyarrow, Pillow, numpy): the dataset's fault
                log.warning("dataset %s: no class counts or samples on its page: %s", state.repo_id,
                            printable(f"{type(exc).__name__}: {exc}", 500))
                view = View({}, [], "its index or one of its images cannot be read (`cifar5m verify` on "
                                    "the server says which)")
            state.answers["view"] = view
        return view


def _histogram(state: RepoState, counts: dict[str, np.ndarray]) -> Html:
    if not counts:
        return Html("")
    top = max(int(c.max()) for c in counts.values()) or 1
    first = next(iter(counts.values()))  # the bars: the first split's counts
    rows = (html("<tr><td>{}</td>{}<td><div class=bar style='width:{}px'></div></td></tr>", cls,
                 joined(html("<td class=num>{:,}</td>", int(c[k])) for c in counts.values()),
                 300 * int(first[k]) // top) for k, cls in enumerate(state.manifest.class_names))
    head = joined(html("<th class=num>{}</th>", s) for s in counts)
    return html("<h2>Classes</h2><table><tr><th>class</th>{}<th></th></tr>{}</table>", head, joined(rows))


def _snippets(origin: str, repo_id: str) -> Html:
    name = repo_id.split("/", 1)[1]
    code = {
        "cifar5m download": f"cifar5m download {repo_id} --endpoint {origin} --local-dir {name}",
        "huggingface_hub": (f"HF_ENDPOINT={origin} python -c \"from huggingface_hub import snapshot_download; "
                            f"print(snapshot_download('{repo_id}', repo_type='dataset'))\""),
        "datasets": (f"HF_ENDPOINT={origin} python -c \"import datasets; "
                     f"print(next(iter(datasets.load_dataset('{repo_id}', split='train', streaming=True))))\""),
        "cifar5m stream": f"cifar5m stream {origin}/datasets/{repo_id}/resolve/main --batch-size 256",
    }
    return html("<h2>Use it</h2>{}", joined(html("<p>{}</p><pre>{}</pre>", k, v) for k, v in code.items()))


def warm(library: Library) -> None:
    """Class counts and sample PNGs of every dataset, made before a first visitor waits for
    them (the first parquet read of a process alone takes ~0.3 s)."""
    for repo_id, state in itertools.islice(library.scan_all(), _WARM_MAX):
        if isinstance(state, Exception):  # unreadable: its page says why when asked
            log.info("no viewer warm-up for %s: %s", repo_id, state)
        else:
            _view(state)


async def samples(ctx: ServerContext, request: web.Request, org: str, name: str, file: str) -> web.Response:
    """``/datasets/<org>/<name>/samples/<class>.png``: a strip of the class's first samples."""
    repo = lookup(ctx, request, org, name, files=True)
    state = await state_at(repo, MAIN, max_age=ctx.config.scan_max_age, ctx=ctx)
    stem, _, ext = file.partition(".")
    not_found = ext != "png" or _CLASS.fullmatch(stem) is None  # no index read or decoding for these
    view = View({}, []) if not_found else await asyncio.to_thread(_view, state)
    if view.problem:
        return hub_error(501, "DatasetUnreadable", f"dataset {state.repo_id}: {view.problem}")
    if not_found or int(stem) >= len(view.strips):
        return hub_error(404, "EntryNotFound", f"no samples image {file} in dataset {state.repo_id}")
    return web.Response(body=view.strips[int(stem)], content_type="image/png",
                        headers={"Cache-Control": "max-age=3600" if request.query.get("rev") == state.sha
                                 else "no-cache", "ETag": f'"{state.sha}-{stem}"'})


def _make_view(state: RepoState) -> View:
    """Samples per class label and split, and one PNG per class of its first ``PER_CLASS``
    train samples (the first split without train), each read by its byte range from a
    served shard and decoded: one read of the index for both."""
    manifest = state.manifest
    blank = np.full((32, PER_CLASS * 33, 3), 255, np.uint8)
    if INDEX_NAME not in state.files:
        return View({}, [_png(blank) for _ in manifest.class_names])
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
    return View(counts, [_png(c) for c in canvases])


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
