"""Helpers for the dataset-server tests: a served root, a server thread, raw HTTP, client runs.

No tests here; test_server*.py and test_download*.py import these.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def build_root(make_dataset: Callable[..., Path], root: Path, repo_ids=("lab/ds",), **kwargs) -> Path:
    """A serve root holding a small dataset per repo id (moved, so mtimes stay as written)."""
    for i, repo_id in enumerate(repo_ids):
        src = make_dataset(f"src{i}", **kwargs)
        dest = root / repo_id
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dest))
    return root


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a server started in another process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Until ``url`` answers 200 (a loaded 2-core box can take a while to start a server);
    ``proc`` is terminated and RuntimeError raised if it dies or the time runs out."""
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the server behind {url} did not start")


@contextmanager
def serving(app) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 (free port) in a thread; yield its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", http="h11",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # generous: 2 cores shared by several jobs in CI
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def serving_granian(app) -> Iterator[str]:
    """Run ``app`` with granian's embedded server (same Rust worker as ``cifar5m serve``)
    on 127.0.0.1 in a thread with its own event loop; yield its base URL."""
    import asyncio

    from granian.constants import HTTPModes, Interfaces
    from granian.log import LogLevels
    from granian.server.embed import Server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Server(app, address="127.0.0.1", port=port, interface=Interfaces.ASGINL, http=HTTPModes.http1,
                    websockets=False, log_level=LogLevels.error)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("granian test server did not start") from None
            time.sleep(0.05)
    try:
        yield url
    finally:
        loop.call_soon_threadsafe(server.stop)
        thread.join(10)


@contextmanager
def serving_aiohttp(app, *, keep_alive_s: float = 30, **limits) -> Iterator[str]:
    """Run ``app`` through aiohttp and the ASGI bridge (as ``cifar5m serve --server aiohttp``;
    ``limits`` go to ``build_application``) on 127.0.0.1 in a thread; yield its base URL."""
    import asyncio

    from aiohttp import web

    from dataset_server.bridge import build_application

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(build_application(app, **limits), access_log=None, shutdown_timeout=2,
                           keepalive_timeout=keep_alive_s)
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


ENGINES = {"aiohttp": serving_aiohttp, "uvicorn": serving, "granian": serving_granian}


@pytest.fixture(params=sorted(ENGINES))
def served(request, make_dataset, tmp_path) -> Iterator[tuple[str, Path]]:
    """(base URL, root) of a server over ``root/lab/ds`` (200 train + 50 test PNG samples),
    once per HTTP server ``cifar5m serve --server`` offers."""
    from dataset_server.app import create_app

    root = build_root(make_dataset, tmp_path / "root")
    with ENGINES[request.param](create_app(root=root, page_size=3, scan_max_age=0.0)) as url:
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
