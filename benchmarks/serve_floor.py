"""The floor under ``cifar5m serve``: the least an aiohttp server does to send a file.

One route (``/{name}``), no access rules, no scan, no ETag: open the file, apply a
``Range`` (``cifar5m.dataset_server.ranges``) and send it with the same ``sendfile`` body as
``cifar5m serve`` (``cifar5m.dataset_server.responses.FdResponse``), in ``WORKERS`` processes on
``SO_REUSEPORT`` sockets with the same 4 MiB send buffer. ``serve_bench.py --servers
"aiohttp floor"`` runs it under the same load as nginx and ``cifar5m serve``: the gap
between this row and nginx is aiohttp's and asyncio's, the gap between this row and
``cifar5m serve`` is ours. ``--uvloop`` runs it on uvloop's event loop instead of
asyncio's (``--servers "aiohttp floor, uvloop"``): how much of the floor is the loop.
``--file-response`` sends with aiohttp's own ``web.FileResponse`` instead of ours
(``--servers "aiohttp FileResponse"``).

    python benchmarks/serve_floor.py DIR PORT WORKERS [--uvloop] [--file-response]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import sys


def serve(directory: str, port: int, use_uvloop: bool, file_response: bool) -> None:
    from aiohttp import web

    from cifar5m.dataset_server.ranges import RangeNotSatisfiable, parse_range
    from cifar5m.dataset_server.responses import FdResponse

    async def handle(request: web.Request) -> web.StreamResponse:
        if file_response:  # aiohttp's own file path (Range, ETag, loop.sendfile) instead of ours
            return web.FileResponse(os.path.join(directory, request.match_info["name"]))
        try:
            fd = os.open(os.path.join(directory, request.match_info["name"]), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            raise web.HTTPNotFound() from None
        size = os.fstat(fd).st_size
        try:
            rng = parse_range(request.headers.get("Range"), size)
        except RangeNotSatisfiable:
            os.close(fd)
            raise web.HTTPRequestRangeNotSatisfiable() from None
        if rng is None:
            return FdResponse(fd, 0, size, status=200, headers={"Accept-Ranges": "bytes"})
        return FdResponse(fd, rng.start, rng.end, status=206, headers={"Content-Range": rng.content_range})

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", port))
    app = web.Application()
    app.router.add_route("*", "/{name}", handle)
    loop = None
    if use_uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, sock=sock, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    folder, port_arg, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    procs = [mp.get_context("spawn").Process(target=serve, args=(folder, port_arg, "--uvloop" in sys.argv,
                                                                     "--file-response" in sys.argv))
             for _ in range(workers)]
    # serve_bench stops the floor with SIGTERM: pass it on, or the workers outlive it on the port.
    signal.signal(signal.SIGTERM, lambda *_: [p.terminate() for p in procs if p.pid is not None])
    for p in procs:
        p.start()
    for p in procs:
        p.join()
