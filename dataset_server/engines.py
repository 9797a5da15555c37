"""The HTTP servers that run the app: aiohttp, granian and uvicorn, with the same bounds.

aiohttp (through ``bridge.py``, in worker processes of ``workers.py``) sends file bodies,
ranges included, with ``sendfile``: nothing is copied in user space.

granian (Rust, hyper) offers ASGI ``http.response.pathsend``: whole files are read and
written by Rust code, without a Python chunk loop or the GIL (``responses.FileBody``).
uvicorn streams every file through Python. Bounds on all three:

- headers: hyper (granian) answers 431 past 100 headers or its ~408 KiB read buffer;
  h11 (uvicorn) bounds header bytes arriving in pieces; aiohttp's parser refuses a line
  or header over ``max_header_bytes`` and more than twice ``max_headers`` headers (400);
  the app's ``Limits`` refuses more than 100 headers, 64 KiB of headers and 8 KiB of URL.
- bodies: read only by paths-info, which refuses more than 1 MiB (413).
- connections: uvicorn answers 503 past ``limit_concurrency``, the aiohttp bridge past
  as many requests in flight per worker; granian queues requests past ``backpressure``
  per worker and connections past ``backlog``.
- idle connections: uvicorn closes keep-alive connections after ``keep_alive_s``;
  granian (hyper's header read timeout) closes a connection that is idle, or slower
  than that to send its headers, after the same time (checked with 2 s: all three);
  aiohttp (``keepalive_timeout``) does the same for all three (tested).
- HTTP/1.1 only on granian: its HTTP/2 header limit (16 MiB) would bypass the bounds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dataset_server.server import ServeConfig

CONFIG_ENV = "CIFAR5M_SERVE_CONFIG"
APP_FACTORY = "dataset_server.server:app_from_env"
ENGINES = ("aiohttp", "granian", "uvicorn")  # the default (ServeConfig.server) first


def run_uvicorn(config: ServeConfig) -> None:
    """Serve with uvicorn until Ctrl-C / SIGTERM (its graceful shutdown: ``graceful_s``)."""
    import uvicorn

    from dataset_server.app import create_app

    common = dict(host=config.host, port=config.port, access_log=False,
                  log_config=None, proxy_headers=False, server_header=False,
                  limit_concurrency=config.limit_concurrency,
                  timeout_keep_alive=config.keep_alive_s,
                  timeout_graceful_shutdown=config.graceful_s,
                  h11_max_incomplete_event_size=config.max_header_bytes, http=config.http,
                  loop=config.loop)
    if config.workers == 1:
        uvicorn.run(create_app(**config.app_kwargs()), **common)
    else:
        os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
        uvicorn.run(APP_FACTORY, factory=True, workers=config.workers, **common)


def run_granian(config: ServeConfig) -> None:
    """Serve with granian until Ctrl-C / SIGTERM; workers get ``graceful_s`` to finish.

    granian runs the app in worker processes (also with one worker), which build it from
    the config passed in the environment.
    """
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server import Server

    os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
    server = Server(
        APP_FACTORY, factory=True, address=config.host, port=config.port,
        # asginl: no lifespan (the app has none; granian would log a warning per worker).
        interface=Interfaces.ASGINL, http=HTTPModes.http1, websockets=False,
        workers=config.workers, loop=Loops(config.loop), backlog=config.limit_concurrency,
        http1_settings=HTTP1Settings(header_read_timeout=config.keep_alive_s * 1000),
        log_access=False, log_level=LogLevels.warning, workers_kill_timeout=config.graceful_s,
    )
    server.serve()
