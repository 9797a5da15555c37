"""Worker processes of ``cifar5m serve``: each runs the aiohttp app on its own socket.

Why not gunicorn's shared socket: asyncio accepts every pending connection in one wake-up,
so the worker that wakes first takes a burst of new connections. Measured with 32 clients
connecting at once to 4 gunicorn workers: 15/14/2/1 connections per worker (granian:
10/8/7/7), and the busiest worker capped the whole server. aiohttp's own multi-process
pattern (``web.run_app(reuse_port=True)`` per process) has the same kernel spreading, but
nothing that keeps the port or restarts a worker. Here the supervisor opens one
``SO_REUSEPORT`` listening socket per worker and the kernel spreads connections over them
(10/9/7/6).

The supervisor first checks the port with a plain bind (which fails next to any listener,
another ``cifar5m serve`` included), then binds all the sockets itself and keeps them: a
second server cannot join the port afterwards, ``--port 0`` gives one port for all workers,
and a replaced worker gets the same socket. Workers (``spawn``: nothing inherited but the
config and their socket) build the app, serve, and stop when the supervisor goes away. A
worker that dies is replaced, unless it keeps dying at start. Ctrl-C or SIGTERM stops them:
each stops accepting, gives running requests ``graceful_s``, and is killed if still there
``graceful_s + 5`` s later.
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
import time
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event

from cifar5m.core.errors import ServerConfigError
from cifar5m.dataset_server.config import ServeConfig, configure_logging

log = logging.getLogger("dataset_server")
START_S = 60.0  # seconds a worker may take to build the app and listen
QUICK_DEATH_S = 10.0  # a worker that dies this soon after starting counts as failing to start
MAX_QUICK_DEATHS = 3


def run_workers(config: ServeConfig) -> None:
    """Serve with ``config.workers`` aiohttp processes until Ctrl-C / SIGTERM."""
    if config.workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        raise ServerConfigError("--workers above 1 needs SO_REUSEPORT (Linux, BSD); pass --workers 1")
    sockets = listen(config.host, config.port, config.workers, send_buffer=config.send_buffer)
    port = sockets[0].getsockname()[1]
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    workers: list[_Worker] = []
    try:
        for sock in sockets:
            workers.append(_Worker(config, sock))
            if not workers[-1].wait_listening(stopping):
                return  # stopped while starting
        log.info("listening on http://%s:%d (%d workers)", config.host, port, config.workers)
        while not stopping.wait(0.5):
            for i, worker in enumerate(workers):
                if not worker.proc.is_alive() and not stopping.is_set():
                    workers[i] = worker.replacement(i)
    finally:
        _stop([w.proc for w in workers], config.graceful_s)
        for sock in sockets:
            sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def listen(host: str, port: int, count: int, *, send_buffer: int = 0) -> list[socket.socket]:
    """``count`` listening sockets on ``host:port`` (SO_REUSEPORT when more than one), whose
    connections get a ``send_buffer``-byte SO_SNDBUF (0: the kernel's autotuning).

    Raises ServerConfigError if the port is taken: the first bind is a plain one, which
    fails next to any listener; the others then join only this process's sockets.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
        sockets.append(probe)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is fine
        probe.bind((host, port))  # no SO_REUSEPORT: fails if anyone listens here
        port = probe.getsockname()[1]  # --port 0: the one port every worker shares
        if count > 1:
            probe.close()
            sockets.clear()
            for _ in range(count):
                sock = socket.socket(family, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((host, port))
        for sock in sockets:
            if send_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)  # accepted ones inherit it
            sock.listen(1024)
            sock.set_inheritable(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ServerConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; "
                                "is another server running there? pass another --port") from exc
    return sockets


class _Worker:
    """One worker process on one of the supervisor's sockets."""

    def __init__(self, config: ServeConfig, sock: socket.socket, quick_deaths: int = 0) -> None:
        self.config, self.sock, self.quick_deaths = config, sock, quick_deaths
        ctx = mp.get_context("spawn")
        self.ready = ctx.Event()
        self.proc = ctx.Process(target=serve_worker, args=(json.dumps(dataclasses.asdict(config)), self.ready, sock),
                                name="cifar5m-serve-worker", daemon=True)
        self.started = time.monotonic()
        self.proc.start()

    def wait_listening(self, stopping: threading.Event) -> bool:
        """True once the worker serves; False if a stop came first; raises if it died."""
        while not self.ready.wait(0.1):
            if stopping.is_set():
                return False
            if not self.proc.is_alive() or time.monotonic() - self.started > START_S:
                raise ServerConfigError(f"a server worker did not start (status {self.proc.exitcode}); "
                                        "see the log lines above")
        return True

    def replacement(self, index: int) -> _Worker:
        """A new worker on the same socket; refuses after repeated deaths right at start."""
        quick = self.quick_deaths + 1 if time.monotonic() - self.started < QUICK_DEATH_S else 0
        if quick >= MAX_QUICK_DEATHS:
            raise ServerConfigError(f"server worker {index} died {quick} times within {QUICK_DEATH_S:.0f} s "
                                    f"of starting (last status {self.proc.exitcode}); see the log lines above")
        log.warning("worker %d (pid %s) ended with status %s; starting another", index, self.proc.pid,
                    self.proc.exitcode)
        return _Worker(self.config, self.sock, quick)


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


def serve_worker(config_json: str, ready: Event, sock: socket.socket) -> None:
    """One worker process: build the app, serve on ``sock`` until SIGTERM/SIGINT or until
    the supervisor is gone."""
    config = ServeConfig(**json.loads(config_json))
    configure_logging(access_log=config.access_log)
    asyncio.run(_serve(config, ready, sock))


async def _serve(config: ServeConfig, ready: Event, sock: socket.socket) -> None:
    from aiohttp import web

    from cifar5m.dataset_server import viewer
    from cifar5m.dataset_server.app import CTX, create_app, runner_of

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    parent = mp.parent_process()
    if parent is not None:  # readable once the supervisor has exited, even by SIGKILL
        loop.add_reader(parent.sentinel, stop.set)
    runner = runner_of(create_app(**dataclasses.asdict(config)), keep_alive_s=config.keep_alive_s,
                       graceful_s=config.graceful_s, access_log=config.access_log)
    await runner.setup()
    try:
        await web.SockSite(runner, sock, backlog=config.limit_concurrency).start()
        ready.set()
        loop.run_in_executor(None, viewer.warm, runner.app[CTX].library)  # the dataset pages' data
        await stop.wait()
    finally:
        await runner.cleanup()  # stops accepting, waits up to graceful_s for running requests
