"""Running the server: configuration, start-up hashing, then granian or uvicorn.

Start-up scans every dataset once, so files that need hashing (those changed after
their manifest was written, e.g. copied without ``cp -p``) are hashed before the
first client waits on them; with several workers the hashes go to a cache file
every worker loads, instead of each worker hashing again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cifar5m.errors import ServerConfigError
from dataset_server.auth import AccessPolicy
from dataset_server.engines import CONFIG_ENV, ENGINES, run_granian, run_uvicorn
from dataset_server.repo import Library
from dataset_server.workers import run_workers

if TYPE_CHECKING:
    from starlette.applications import Starlette

log = logging.getLogger("dataset_server")



@dataclass(frozen=True)
class ServeConfig:
    """Everything ``cifar5m serve`` was started with."""

    root: str
    host: str = "127.0.0.1"
    port: int = 8000
    tokens: str | None = None
    workers: int = 1
    page_size: int = 1000
    access_log: bool = True
    # Request bounds: body of POST /paths-info, header count, request line + headers
    # in bytes (h11), open connections (beyond: 503), idle keep-alive seconds.
    max_body: int = 1024 * 1024
    max_headers: int = 100
    max_header_bytes: int = 64 * 1024
    limit_concurrency: int = 1024
    keep_alive_s: int = 30
    # Seconds that running downloads get to finish after Ctrl-C / SIGTERM.
    graceful_s: int = 10
    # h11 bounds header bytes while they arrive; httptools (faster parsing) does not.
    http: str = "h11"
    # "auto": uvloop when installed (the `serve` extra), else asyncio.
    loop: str = "auto"
    # aiohttp sends files with sendfile (bridge.py); granian from Rust (ASGI pathsend);
    # uvicorn through Python. docs/serving.md has the numbers.
    server: str = "aiohttp"
    hash_cache: str | None = None

    def app_kwargs(self) -> dict:
        return {"root": self.root, "tokens": self.tokens, "page_size": self.page_size,
                "max_body": self.max_body, "max_headers": self.max_headers,
                "max_header_bytes": self.max_header_bytes, "hash_cache": self.hash_cache}


def check_config(config: ServeConfig) -> None:
    """Raise ServerConfigError for a root or token file that cannot be served."""
    root = Path(config.root)
    if not root.is_dir():
        raise ServerConfigError(f"serve root {root} is not a directory; pass the folder that holds <org>/<name>/ datasets")
    AccessPolicy.from_file(config.tokens)
    if config.page_size < 1 or config.workers < 1:
        raise ServerConfigError("--page-size and --workers must be at least 1")
    if config.server not in ENGINES:
        raise ServerConfigError(f"--server {config.server!r} is not one of {', '.join(ENGINES)}")
    if config.server != "uvicorn" and importlib.util.find_spec(config.server) is None:  # engine = package
        raise ServerConfigError(f"{config.server} is not installed: pip install 'cifar5m[serve]', "
                                "or pass --server uvicorn")


def prewarm(config: ServeConfig) -> tuple[Library, list[str]]:
    """Scan (and hash where needed) every dataset under the root; log what is served."""
    library = Library(Path(config.root))
    served = []
    for repo_id in library.repo_ids():
        repo = library.get(*repo_id.split("/", 1))
        if repo is None:
            continue
        try:
            state = repo.scan()
        except (OSError, ValueError) as exc:
            log.warning("not serving %s: %s", repo_id, exc)
            continue
        size = sum(f.size for f in state.files.values())
        log.info("serving %s: %d files, %.1f MB, commit %s", repo_id, len(state.files), size / 1e6, state.sha)
        served.append(repo_id)
    if not served:
        log.warning("no datasets under %s (expected %s/<org>/<name>/manifest.json)", config.root, config.root)
    return library, served


def configure_logging(*, access_log: bool) -> None:
    """Log lines to stderr with a time stamp; the access log at INFO unless turned off."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("dataset_server.access").setLevel(logging.INFO if access_log else logging.WARNING)


def app_from_env() -> Starlette:
    """Build the app from the JSON config that ``run`` put in the environment."""
    from dataset_server.app import create_app

    config = ServeConfig(**json.loads(os.environ[CONFIG_ENV]))
    configure_logging(access_log=config.access_log)
    return create_app(**config.app_kwargs())


def run(config: ServeConfig) -> None:
    """Serve until Ctrl-C or SIGTERM, then finish running requests (up to ``graceful_s``)."""
    check_config(config)
    configure_logging(access_log=config.access_log)  # before prewarm: it logs what is served
    library, _ = prewarm(config)
    with tempfile.TemporaryDirectory(prefix="cifar5m-serve-") as tmp:
        cache = Path(tmp) / "hashes.json"
        library.hashes.save(cache)
        config = dataclasses.replace(config, hash_cache=str(cache))
        with _quiet_stop_signals():
            {"aiohttp": run_workers, "granian": run_granian, "uvicorn": run_uvicorn}[config.server](config)
    log.info("server stopped")


@contextmanager
def _quiet_stop_signals() -> Iterator[None]:
    """Make Ctrl-C / SIGTERM a normal exit (status 0) after the server's graceful shutdown.

    uvicorn handles both signals while serving, then re-raises the one it caught into
    the handlers that were there before: the defaults would turn a clean stop into
    KeyboardInterrupt or death by SIGTERM (status -15). granian installs its own
    handlers in the main process and stops its workers (``graceful_s`` each at most).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
