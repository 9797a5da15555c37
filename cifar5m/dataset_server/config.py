"""What ``cifar5m serve`` runs with: its configuration and its log set-up (read by the
supervisor in ``server``, by each worker process in ``workers`` and by ``app.create_app``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``cifar5m serve`` was started with: the one place of the server's defaults."""

    root: str
    host: str = "127.0.0.1"
    port: int = 8000
    tokens: str | None = None
    workers: int = 2  # processes, about one per free core
    page_size: int = 1000
    access_log: bool = True
    # Request bounds: body of POST /paths-info, header count, request line + headers
    # in bytes, requests in flight per worker (beyond: 503), idle keep-alive seconds.
    max_body: int = 1024 * 1024
    max_headers: int = 100
    max_header_bytes: int = 64 * 1024
    limit_concurrency: int = 1024
    keep_alive_s: int = 30
    # Seconds that running downloads get to finish after Ctrl-C / SIGTERM.
    graceful_s: int = 10
    # SO_SNDBUF of each connection: a 5 MB shard goes into the socket in one sendfile call
    # instead of one per event-loop wake-up as the client drains (whole shards under 32
    # clients: 0.21-0.24 -> 0.16-0.17 server CPU-s/GB, docs/serving.md). The kernel caps it
    # at net.core.wmem_max; memory is used only for bytes queued. 0: kernel autotuning.
    send_buffer: int = 4 * 1024 * 1024
    # A file request re-stats the whole dataset at most this often (seconds); each one
    # still checks its own file, and API calls always re-check every file.
    scan_max_age: float = 1.0
    hash_cache: str | None = None
    # A root on an object store (s3://bucket/prefix): fsspec options (credentials, endpoint,
    # ...), and the seconds a signed URL of one of its files stays valid.
    storage_options: dict | None = None
    url_expiry_s: int = 300
    # File GETs answered with "X-Accel-Redirect: <this prefix><the file's path under root>"
    # for nginx to send the bytes (docs/serving.md); None: the server sends them itself.
    accel_redirect: str | None = None


def configure_logging(*, access_log: bool) -> None:
    """Log lines to stderr with a time stamp; the access log at INFO unless turned off."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("dataset_server.access").setLevel(logging.INFO if access_log else logging.WARNING)
