"""Worker processes of ``cifar5m serve --server aiohttp``: each listens on its own socket.

Why not gunicorn's shared socket: asyncio accepts every pending connection in one wake-up,
so the worker that wakes first takes a burst of new connections. Measured with 32 clients
connecting at once to 4 gunicorn workers: 15/14/2/1 connections per worker (granian:
10/8/7/7), and the busiest worker capped the whole server. With ``SO_REUSEPORT`` each
worker has a listening socket of its own and the kernel spreads connections over them.

The supervisor checks that the port is free (a plain bind, which fails next to any
listener, ours included), starts the workers (``spawn``: nothing inherited but the
config), waits until each listens, restarts one that dies, and on Ctrl-C or SIGTERM stops
them: each stops accepting, gives running requests ``graceful_s``, and is killed if still
there ``graceful_s + 5`` s later.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import multiprocessing as mp
import signal
import socket
import threading
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import TYPE_CHECKING

from cifar5m.errors import ServerConfigError

if TYPE_CHECKING:
    from dataset_server.server import ServeConfig

log = logging.getLogger("dataset_server")
START_S = 60.0  # seconds a worker may take to build the app and listen


def run_workers(config: ServeConfig) -> None:
    """Serve with ``config.workers`` aiohttp processes until Ctrl-C / SIGTERM."""
    if config.workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        raise ServerConfigError("--workers above 1 with --server aiohttp needs SO_REUSEPORT (Linux, BSD); "
                                "pass --workers 1 or --server granian")
    check_port(config.host, config.port)
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    workers: list[tuple[BaseProcess, Event]] = []
    try:
        for i in range(config.workers):
            workers.append(_start(config))
            _wait_listening(*workers[i], i)
        log.info("listening on http://%s:%d (%d aiohttp workers)", config.host, config.port, config.workers)
        while not stopping.wait(0.5):
            for i, (proc, _) in enumerate(workers):
                if not proc.is_alive() and not stopping.is_set():
                    log.warning("worker %d (pid %s) ended with status %s; starting another", i, proc.pid, proc.exitcode)
                    workers[i] = _start(config)
    finally:
        _stop([proc for proc, _ in workers], config.graceful_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_port(host: str, port: int) -> None:
    """Raise ServerConfigError if ``host:port`` cannot be listened on (e.g. a server is there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServerConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; "
                                    "is another server running there? pass another --port") from exc


def _start(config: ServeConfig) -> tuple[BaseProcess, Event]:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=serve_worker, args=(json.dumps(dataclasses.asdict(config)), ready),
                       name="cifar5m-serve-worker", daemon=True)
    proc.start()
    return proc, ready


def _wait_listening(proc: BaseProcess, ready: Event, index: int) -> None:
    waited = 0.0
    while not ready.wait(0.1):
        waited += 0.1
        if not proc.is_alive() or waited > START_S:
            raise ServerConfigError(f"server worker {index} did not start (status {proc.exitcode}); "
                                    "see the log lines above")


def _stop(procs: list[BaseProcess], graceful_s: float) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()  # SIGTERM: the worker's graceful shutdown
    for proc in procs:
        proc.join(graceful_s + 5)
        if proc.is_alive():
            log.warning("worker pid %s still running after %s s: killed", proc.pid, graceful_s + 5)
            proc.kill()
            proc.join()


def serve_worker(config_json: str, ready: Event) -> None:
    """One worker process: build the app, listen (SO_REUSEPORT), serve until SIGTERM/SIGINT."""
    from dataset_server.server import ServeConfig, configure_logging

    config = ServeConfig(**json.loads(config_json))
    configure_logging(access_log=config.access_log)
    asyncio.run(_serve(config, ready))


async def _serve(config: ServeConfig, ready: Event) -> None:
    from aiohttp import web

    from dataset_server.app import create_app
    from dataset_server.bridge import build_application

    app = build_application(create_app(**config.app_kwargs()), limit_concurrency=config.limit_concurrency,
                            max_headers=config.max_headers, max_header_bytes=config.max_header_bytes)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=config.keep_alive_s,
                           shutdown_timeout=config.graceful_s, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, config.host, config.port, backlog=config.limit_concurrency,
                          reuse_port=config.workers > 1).start()
        ready.set()
        await stop.wait()
    finally:
        await runner.cleanup()  # stops listening, waits up to graceful_s for running requests
