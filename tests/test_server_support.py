"""Helpers for the dataset-server tests: a served root, a server thread, raw HTTP, client runs.

No tests here; test_server*.py and test_download*.py import these.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from aiohttp import web

from cifar5m.dataset_server.launcher import free_port, wait_http  # noqa: F401 (re-exported to the tests)

REPO_ROOT = Path(__file__).resolve().parents[1]


def build_root(make_dataset: Callable[..., Path], root: Path, repo_ids=("lab/ds",), **kwargs) -> Path:
    """A serve root holding a small dataset per repo id (moved, so mtimes stay as written)."""
    for i, repo_id in enumerate(repo_ids):
        src = make_dataset(f"src{i}", **kwargs)
        dest = root / repo_id
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dest))
    return root


@contextmanager
def serving(app, *, keep_alive_s: float = 30, access_log: bool = False) -> Iterator[str]:
    """Run the aiohttp ``app`` (as each ``cifar5m serve`` worker does) on 127.0.0.1 in a
    thread with its own event loop; yield its base URL."""
    import asyncio

    from aiohttp import web

    from cifar5m.dataset_server.app import runner_of

    loop = asyncio.new_event_loop()
    runner = runner_of(app, keep_alive_s=keep_alive_s, graceful_s=2, access_log=access_log)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def served(make_dataset, tmp_path) -> Iterator[tuple[str, Path]]:
    """(base URL, root) of a server over ``root/lab/ds`` (200 train + 50 test PNG samples)."""
    from cifar5m.dataset_server.app import create_app

    root = build_root(make_dataset, tmp_path / "root")
    with serving(create_app(root=root, page_size=3, scan_max_age=0.0)) as url:
        yield url, root


def request(url: str, method: str, path: str, *, headers: dict | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request (the path is sent exactly as given, '..' included)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        try:
            conn.endheaders(body)
        except (BrokenPipeError, ConnectionResetError):
            # The server answered (413) before reading the whole body and closed the
            # connection: its answer is still in our receive buffer.
            if body is None:
                raise
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def client_env(url: str, home: Path) -> dict[str, str]:
    """Environment for a client process pointed at ``url``, caches under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=url, HF_HOME=str(home / "hf"), HF_HUB_CACHE=str(home / "hf" / "hub"),
               HF_DATASETS_CACHE=str(home / "hf" / "datasets"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               HF_HUB_DISABLE_IMPLICIT_TOKEN="1", PYTHONPATH=str(REPO_ROOT), TQDM_DISABLE="1")
    return env


def run_client(script: str, url: str, home: Path, *, timeout: float = 120) -> dict:
    """Run ``script`` in a fresh Python with HF_ENDPOINT=url; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, "-c", script], env=client_env(url, home), cwd=home,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"client failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Lying:
    """A middleware making ``app`` a hostile server: ``manifest`` (bytes) is served in place of
    every dataset's manifest.json, and ``extra[name]`` bytes follow the real body of file ``name``
    (sent chunked, as a server that does not say how long its body is); ``sent[name]`` counts
    the bytes of the body that went out."""

    def __init__(self, app) -> None:
        self.manifest: bytes | None = None
        self.extra: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        app.middlewares.append(self.middleware)

    @web.middleware
    async def middleware(self, request, handler):
        name = request.path.rsplit("/", 1)[-1]
        response = await handler(request)
        if "/resolve/" not in request.path or response.status not in (200, 206):
            return response
        if name == "manifest.json" and self.manifest is not None:
            if hasattr(response, "fd"):
                os.close(response.fd)
            headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "etag")}
            return web.Response(body=self.manifest, headers={
                **headers, "ETag": f'"{hashlib.sha256(self.manifest).hexdigest()}"'})
        if name not in self.extra or request.method != "GET":
            return response
        data = os.pread(response.fd, response.end - response.start, response.start)
        os.close(response.fd)
        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        lying = web.StreamResponse(status=response.status, headers=headers)
        lying.enable_chunked_encoding()
        await lying.prepare(request)
        self.sent[name] = 0
        try:
            for piece in [data, *[b"\0" * (1 << 20)] * (self.extra[name] >> 20)]:
                await lying.write(piece)
                self.sent[name] += len(piece)
            await lying.write_eof()
        except (ConnectionError, RuntimeError):  # the client stopped reading and hung up
            pass
        return lying
