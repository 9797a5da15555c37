"""A TCP proxy on 127.0.0.1 that adds a round trip to each request, bulk bytes at full speed.

Every chunk the client sends (an HTTP request is one) reaches the server ``rtt`` seconds
after it arrived, in order, and so does a new connection (the handshake); the server's
bytes flow back at once. So each request/response exchange costs one extra round trip,
as behind a network ``rtt`` away, while large bodies still move at loopback speed.
It counts connections, client chunks (~requests) and the bytes sent back.

    with DelayProxy("127.0.0.1", 8000, rtt=0.02) as proxy:  # proxy.port forwards to :8000
        ...
"""

from __future__ import annotations

import asyncio
import threading


class DelayProxy:
    def __init__(self, host: str, port: int, *, rtt: float) -> None:
        self.target, self.rtt = (host, port), rtt
        self.connections = self.requests = self.bytes_back = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="delay-proxy")

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def counts(self) -> dict[str, int]:
        return {"connections": self.connections, "requests": self.requests, "bytes": self.bytes_back}

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await asyncio.sleep(self.rtt)  # the handshake's round trip
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._up(reader, up_writer), self._down(up_reader, writer),
                             return_exceptions=True)
        for w in (writer, up_writer):
            w.close()

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Client to server, each chunk ``rtt`` after it arrived (in order)."""
        loop, pending = self._loop, asyncio.Queue()

        async def send() -> None:
            while (item := await pending.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(send())
        while data := await reader.read(1 << 16):
            self.requests += 1
            pending.put_nowait((loop.time() + self.rtt, data))
        pending.put_nowait(None)
        await sender

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 20):
            self.bytes_back += len(data)
            writer.write(data)
            await writer.drain()
        writer.close()
