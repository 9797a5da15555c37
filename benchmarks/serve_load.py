"""The load clients of ``serve_bench.py`` and the CPU accounting around them.

The clients are asyncio tasks in one process (``--client-procs`` to use more) on raw
HTTP/1.1 keep-alive sockets. A body is received with ``sock_recv_into`` straight into a
buffer each client reuses, and checked with ``bytes.startswith(view, start)`` against the
original file held in memory: a memcmp, no copy (measured 26-42 GB/s here, against
0.4 GB/s for ``memoryview ==`` and one extra 5 MB copy per shard for ``http.client``'s
``read()``). The previous clients (32 threads of ``http.client`` in two processes) spent
as much CPU as the server and shared its two cores, so they capped both rows.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import socket
import time
from dataclasses import dataclass, field

REPO = "bench/ds"
TIMEOUT_S = 30.0
_HEAD_MAX = 64 * 1024
# SO_RCVLOWAT for bodies: epoll wakes a client once 256 KiB are queued, not per 64 KiB
# segment (client CPU 0.49 and 0.37 CPU-s/GB against 0.51 and 0.41 with 1; 8 s runs).
_LOWAT = 256 * 1024


class Conn:
    """One client connection: reconnects when the server closed (http.server: HTTP/1.0)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.head = bytearray(_HEAD_MAX)
        self.lowat = 1

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def request(self, method: str, path: str, into: memoryview, *, headers: str = "",
                      body: bytes = b"") -> tuple[int, dict[str, str], int]:
        """Send one request; the body goes into ``into``. Returns status, headers, body length."""
        loop = asyncio.get_running_loop()
        if self.sock is None:
            self.sock = socket.socket()
            self.lowat = 1
            self.sock.setblocking(False)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        req = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
               f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body
        if self.lowat != 1:  # headers and small bodies: wake on any byte
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            self.lowat = 1
        await loop.sock_sendall(self.sock, req)
        view, got, end = memoryview(self.head), 0, -1
        while end < 0:
            n = await loop.sock_recv_into(self.sock, view[got:])
            if n == 0:
                raise ConnectionError(f"connection closed after {got} header bytes")
            got += n
            end = self.head.find(b"\r\n\r\n", max(0, got - n - 3), got)
        lines = bytes(self.head[:end]).decode("latin-1").split("\r\n")
        version, status = lines[0].split(" ", 2)[:2]
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = 0 if method == "HEAD" or status in ("204", "304") else int(hdrs["content-length"])
        if length > len(into):
            raise ValueError(f"body of {length} bytes does not fit the {len(into)} byte buffer")
        early = got - end - 4
        into[:early] = view[end + 4:got]
        pos = early
        while pos < length:
            lowat = min(length - pos, _LOWAT)
            if lowat != self.lowat:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
                self.lowat = lowat
            n = await loop.sock_recv_into(self.sock, into[pos:length])
            if n == 0:
                raise ConnectionError(f"connection closed after {pos} of {length} body bytes")
            pos += n
        keep = hdrs.get("connection", "").lower()
        if keep == "close" or (version == "HTTP/1.0" and keep != "keep-alive"):
            self.close()
        return int(status), hdrs, length


@dataclass
class Stats:
    bytes: int = 0
    wire: int = 0
    full: int = 0
    ranges: int = 0
    errors: int = 0
    lat: list[float] = field(default_factory=list)
    api: list[float] = field(default_factory=list)
    why: list[str] = field(default_factory=list)


async def _api_call(conn: Conn, ours: bool, prefix: str, name: str, rnd: random.Random,
                    scratch: memoryview) -> int:
    if not ours:
        return (await conn.request("HEAD", f"/{name}", scratch))[0]
    kind = rnd.randrange(4)
    if kind == 0:
        return (await conn.request("GET", f"/api/datasets/{REPO}", scratch))[0]
    if kind == 1:
        return (await conn.request("GET", f"/api/datasets/{REPO}/tree/main?recursive=true&expand=false",
                                   scratch))[0]
    if kind == 2:
        return (await conn.request("POST", f"/api/datasets/{REPO}/paths-info/main", scratch,
                                   headers="Content-Type: application/x-www-form-urlencoded\r\n",
                                   body=f"paths={name}&expand=false".encode()))[0]
    return (await conn.request("HEAD", f"{prefix}/{name}", scratch))[0]


async def _download(conn: Conn, prefix: str, name: str, data: bytes, rnd: random.Random,
                    view: memoryview, st: Stats, range_fraction: float, max_range: int) -> None:
    """One whole shard or range; checks exactly the bytes asked for, on both servers.

    http.server answers a range with 200 and the whole file: its body must be the
    whole file's length, and the asked slice of it is compared (the rest is received
    and counted as wire bytes, not compared), so both servers have the same bytes checked.
    """
    if rnd.random() < range_fraction:
        start = rnd.randrange(len(data))
        end = min(len(data), start + rnd.randrange(1, max_range + 1))
        status, hdrs, n = await conn.request("GET", f"{prefix}/{name}", view,
                                             headers=f"Range: bytes={start}-{end - 1}\r\n")
        st.ranges += 1
        if status == 206:
            ok = (n == end - start and hdrs.get("content-range") == f"bytes {start}-{end - 1}/{len(data)}"
                  and data.startswith(view[:n], start))
        else:
            ok = status == 200 and n == len(data) and data.startswith(view[start:end], start)
    else:
        start, end = 0, len(data)
        status, _, n = await conn.request("GET", f"{prefix}/{name}", view)
        st.full += 1
        ok = status == 200 and n == len(data) and data.startswith(view[:n])
    st.wire += n
    if ok:
        st.bytes += end - start
    else:
        st.errors += 1
        st.why.append(f"{name}: status {status}, {n} bytes, wrong length or bytes")


async def _client(files: dict[str, bytes], port: int, prefix: str, ours: bool, deadline: float,
                  args, seed: int, st: Stats) -> None:
    rnd = random.Random(seed)  # the same seed gives the same requests on every server
    names = sorted(files)
    buf = memoryview(bytearray(max(map(len, files.values())) + 1))
    conn = Conn(port)
    try:
        for i in range(args.max_requests):
            if time.monotonic() >= deadline:
                break
            name = rnd.choice(names)
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(TIMEOUT_S):
                    if i % 10 == 9:
                        status = await _api_call(conn, ours, prefix, name, rnd, buf)
                        st.api.append(time.perf_counter() - t0)
                        if status != 200:
                            st.errors += 1
                            st.why.append(f"API call on {name}: status {status}")
                        continue
                    await _download(conn, prefix, name, files[name], rnd, buf, st,
                                    args.range_fraction, args.max_range)
                st.lat.append(time.perf_counter() - t0)
            except (OSError, ValueError, KeyError, TimeoutError) as exc:
                st.errors += 1
                st.why.append(f"{name}: {type(exc).__name__}: {exc}")
                conn.close()
    finally:
        conn.close()


def client_proc(files: dict[str, bytes], port: int, prefix: str, ours: bool, args, tasks: int,
                seed: int, queue) -> None:
    """One client process: ``tasks`` concurrent clients on one event loop (uvloop if installed)."""
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run

    async def main() -> list[Stats]:
        deadline = time.monotonic() + args.seconds
        stats = [Stats() for _ in range(tasks)]
        await asyncio.gather(*(_client(files, port, prefix, ours, deadline, args, seed * 1000 + t, s)
                               for t, s in enumerate(stats)))
        return stats

    queue.put(run(main()))


# --- CPU accounting -----------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """utime + stime in seconds of ``pid`` and all its live descendants (workers, threads)."""
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICK
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo.extend(c for c, pp in parent.items() if pp == p)
    return total


def children_cpu_s() -> float:
    """CPU seconds of this process's reaped children (the client processes, once joined)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def box_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (all processes, interrupts, softirq)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK  # minus idle and iowait


def wait_idle(pid: int, *, quiet_s: float = 0.05, max_s: float = 15.0) -> None:
    """Wait until the server's processes stop using CPU (workers still importing at start)."""
    deadline = time.monotonic() + max_s
    before = tree_cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = tree_cpu_s(pid)
        if now - before < quiet_s:
            return
        before = now
