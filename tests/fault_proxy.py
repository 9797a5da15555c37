"""A fault-injecting HTTP proxy on 127.0.0.1 for the tests: faults on the way, on purpose.

Every ``every``-th request that carries a ``Range`` header (sample reads; the manifest and
index are whole-file GETs and pass untouched) gets the next fault of ``faults``, in turn:

* ``503``: a ``503 Slow Down`` answer (S3's SlowDown), the request never reaches the server;
* ``reset``: the reply's headers and half its body, then a TCP reset;
* ``short``: the headers and half the body, then a clean close (a body shorter than its
  Content-Length);
* ``stall``: the headers and half the body, then silence until the client gives up (or
  ``STALL`` seconds).

``limit`` caps the faults injected; ``rtt`` adds a round trip to every request. The proxy reads each upstream reply whole
(``Connection: close`` upstream) before answering, serves each client connection in a
thread of its own, and stops with the ``with`` block (or after ``LIFETIME`` seconds).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter

STALL = 20.0  # seconds a stalled reply holds its connection at most
LIFETIME = 300.0  # the proxy stops by itself after this long


def _read_head(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
    """``(head, rest)`` of the next message on ``sock`` after ``buf``; None at EOF."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


class FaultProxy:
    def __init__(self, upstream: str, *, every: int = 0, faults: tuple[str, ...] = ("503", "reset", "short", "stall"),
                 limit: int | None = None, rtt: float = 0.0) -> None:
        host, _, port = upstream.removeprefix("http://").split("/")[0].partition(":")
        self.target = (host, int(port or 80))
        self.every, self.faults, self.limit, self.rtt = every, faults, limit, rtt
        self.injected: Counter = Counter()
        self.ranged = 0  # requests with a Range header seen
        self.ranges: list[str] = []  # their Range headers, in arrival order
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def url(self, upstream: str) -> str:
        """``upstream`` (a URL of the proxied server) through the proxy."""
        rest = upstream.removeprefix("http://").partition("/")[2]
        return f"http://127.0.0.1:{self.port}/{rest}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        deadline = time.monotonic() + LIFETIME
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _fault(self, head: bytes) -> str | None:
        spec = [line for line in head.split(b"\r\n") if line.lower().startswith(b"range:")]
        if not spec:
            return None
        with self._lock:
            self.ranges.append(spec[0].partition(b":")[2].strip().decode())
            self.ranged += 1
            if not self.every or (self.limit is not None and sum(self.injected.values()) >= self.limit):
                return None
            if self.ranged % self.every:
                return None
            fault = self.faults[(self.ranged // self.every - 1) % len(self.faults)]
            self.injected[fault] += 1
            return fault

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(STALL)
        buf = b""
        try:
            while not self._stop.is_set():
                got = _read_head(client, buf)
                if got is None:
                    return
                head, buf = got
                time.sleep(self.rtt)
                fault = self._fault(head)
                if fault == "503":
                    client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Length: 9\r\n\r\nSlowDown!")
                    continue
                reply = self._forward(head)
                if fault is None:
                    client.sendall(reply)
                    continue
                cut = reply.index(b"\r\n\r\n") + 4
                client.sendall(reply[: cut + (len(reply) - cut) // 2])
                if fault == "reset":
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif fault == "stall":
                    client.recv(1)  # silence until the client gives up (or STALL)
                return
        except OSError:
            return
        finally:
            client.close()

    def _forward(self, head: bytes) -> bytes:
        """The upstream reply to this GET/HEAD, whole, to be sent on a kept-alive connection."""
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith((b"connection:",))]
        with socket.create_connection(self.target, timeout=30) as up:
            up.sendall(b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n")
            chunks = []
            while data := up.recv(1 << 20):
                chunks.append(data)
        reply = b"".join(chunks)
        top, _, body = reply.partition(b"\r\n\r\n")
        keep = [line for line in top.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        return b"\r\n".join(keep) + b"\r\n\r\n" + body
