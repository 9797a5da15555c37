"""A TCP proxy on 127.0.0.1 that adds a round trip to each request, bulk bytes at full speed.

Every chunk the client sends (an HTTP request is one) reaches the server ``rtt`` seconds
after it arrived, and so does a new connection (the handshake); the server's
bytes flow back at once, moved by ``os.splice`` (kernel to kernel: the proxy costs the
benchmark little CPU, which matters on a 2-core box). So each request/response exchange
costs one extra round trip, as behind a network ``rtt`` away, while large bodies still
move at loopback speed. It counts connections, client chunks (~requests) and the bytes
sent back.

    with DelayProxy("127.0.0.1", 8000, rtt=0.02) as proxy:  # proxy.port forwards to :8000
        ...
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time


class DelayProxy:
    def __init__(self, host: str, port: int, *, rtt: float) -> None:
        self.target, self.rtt = (host, port), rtt
        self.connections = self.requests = self.bytes_back = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True, name="delay-proxy")

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def counts(self) -> dict[str, int]:
        return {"connections": self.connections, "requests": self.requests, "bytes": self.bytes_back}

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(None)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle wait on small replies
        with self._lock:
            self.connections += 1
            self._socks.append(client)
        time.sleep(self.rtt)  # the handshake's round trip
        try:
            up = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._socks.append(up)
        threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in
                   ((self._up, (client, up)), (self._down, (up, client)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        client.close()
        up.close()

    def _up(self, client: socket.socket, up: socket.socket) -> None:
        """Client to server, each chunk ``rtt`` after it arrived. An HTTP client sends a
        request in one chunk and waits for the reply before the next, so waiting here
        delays each request by one round trip and nothing else."""
        with contextlib.suppress(OSError):
            while data := client.recv(1 << 16):
                with self._lock:
                    self.requests += 1
                time.sleep(self.rtt)
                up.sendall(data)
            up.shutdown(socket.SHUT_WR)

    def _down(self, up: socket.socket, client: socket.socket) -> None:
        """Server to client through a pipe by ``os.splice`` (no copy into Python)."""
        r, w = os.pipe()
        try:
            while n := os.splice(up.fileno(), w, 1 << 20):
                with self._lock:
                    self.bytes_back += n
                while n:
                    n -= os.splice(r, client.fileno(), n)
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)
