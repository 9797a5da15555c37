"""The aiohttp bridge (``dataset_server/bridge.py``) with small ASGI apps: the scope it
builds, bodies, errors, the concurrency bound, sendfile and its fallbacks, idle connections."""

from __future__ import annotations

import http.client
import json
import time

import pytest

from tests.test_server_support import request, serving_aiohttp


async def echo_scope(scope, receive, send):
    """Answers with the scope's fields and the request body as received, message by message."""
    sizes = []
    while True:
        message = await receive()
        sizes.append(len(message["body"]))
        if not message["more_body"]:
            break
    body = json.dumps({
        "path": scope["path"], "raw_path": scope["raw_path"].decode(), "query": scope["query_string"].decode(),
        "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]], "method": scope["method"],
        "client": scope["client"][0], "extensions": sorted(scope["extensions"]), "body_bytes": sum(sizes),
    }).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"x-two", b"a"), (b"x-two", b"b")]})
    await send({"type": "http.response.body", "body": body[:10], "more_body": True})
    await send({"type": "http.response.body", "body": body[10:]})


def test_the_scope_is_the_request_as_sent_and_bodies_stream_through():
    with serving_aiohttp(echo_scope) as url:
        conn = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=30)
        conn.request("POST", "/api/x/refs%2Fpr%2F1/../a%20b?q=1&r=%2F", body=b"z" * 300_000,
                     headers={"X-Mixed-Case": "V"})
        reply = conn.getresponse()
        status, repeated, got = reply.status, reply.msg.get_all("x-two"), json.loads(reply.read())
        conn.close()
    assert status == 200 and repeated == ["a", "b"]
    assert got["raw_path"] == "/api/x/refs%2Fpr%2F1/../a%20b"  # not normalised, not decoded
    assert got["path"] == "/api/x/refs/pr/1/../a b" and got["query"] == "q=1&r=%2F"
    assert ["x-mixed-case", "V"] in got["headers"] and got["method"] == "POST"
    assert got["client"] == "127.0.0.1" and got["body_bytes"] == 300_000
    assert got["extensions"] == ["http.response.zerocopysend"]


def test_requests_past_the_concurrency_bound_get_503():
    with serving_aiohttp(echo_scope, limit_concurrency=0) as url:
        status, _, body = request(url, "GET", "/anything")
    assert status == 503 and b"busy" in body


async def fails_before_start(scope, receive, send):
    raise ValueError("broken app")


async def fails_mid_body(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
    await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
    raise ValueError("broken mid-body")


def test_app_errors_give_500_or_a_closed_connection(caplog):
    with serving_aiohttp(fails_before_start) as url:
        status, _, body = request(url, "GET", "/")
    assert status == 500 and json.loads(body) == {"error": "internal server error"}
    assert "broken app" in caplog.text
    # Never a complete-looking body: the client sees the connection end short.
    with serving_aiohttp(fails_mid_body) as url, pytest.raises(http.client.IncompleteRead):
        request(url, "GET", "/")


def test_head_answers_carry_no_body_and_the_connection_stays_usable():
    with serving_aiohttp(echo_scope) as url:
        conn = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=30)
        conn.request("HEAD", "/first")
        head = conn.getresponse()
        assert (head.status, head.read()) == (200, b"")
        conn.request("GET", "/second")  # the same connection: no stray body bytes in between
        assert json.loads(conn.getresponse().read())["path"] == "/second"
        conn.close()


def test_files_are_copied_where_the_event_loop_has_no_sendfile(make_dataset, tmp_path, monkeypatch):
    import asyncio

    from dataset_server.app import create_app
    from tests.test_server_support import build_root

    async def no_sendfile(*args, **kwargs):
        raise NotImplementedError  # as uvloop's loop.sendfile

    monkeypatch.setattr(asyncio.BaseEventLoop, "sendfile", no_sendfile)
    root = build_root(make_dataset, tmp_path / "root", n_train=20, n_test=10, shard_size=10)
    data = (root / "lab/ds/train-000000.tar").read_bytes()
    with serving_aiohttp(create_app(root=root)) as url:
        whole = request(url, "GET", "/datasets/lab/ds/resolve/main/train-000000.tar")
        part = request(url, "GET", "/datasets/lab/ds/resolve/main/train-000000.tar",
                       headers={"Range": "bytes=7-5006"})
    assert (whole[0], whole[2]) == (200, data) and (part[0], part[2]) == (206, data[7:5007])


def file_app(path, *, count: int, length: int | None, offset: int = 0):
    """Sends ``count`` bytes of ``path`` from ``offset`` by zerocopysend under a declared
    ``length`` (None: no Content-Length, so the response is chunked)."""
    async def app(scope, receive, send):
        headers = [] if length is None else [(b"content-length", str(length).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        with open(path, "rb", buffering=0) as file:
            await send({"type": "http.response.zerocopysend", "file": file, "offset": offset, "count": count})
    return app


def file_middle(path, data):
    """All of ``data`` but its first and last 1000 bytes."""
    return file_app(path, offset=1000, count=len(data) - 2000, length=len(data) - 2000)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])

def test_a_body_bigger_than_the_socket_buffer_is_sent_whole(tmp_path, monkeypatch):
    """20 MB from an offset: the first sendfile fills the send buffer (4 MiB at most here),
    asyncio's sendfile sends the rest as the client reads."""
    import asyncio
    import socket
    import time

    import numpy as np

    rest = []
    original = asyncio.BaseEventLoop.sendfile

    async def counting(self, transport, file, offset=0, count=None, **kwargs):
        rest.append((offset, count))
        return await original(self, transport, file, offset, count, **kwargs)

    monkeypatch.setattr(asyncio.BaseEventLoop, "sendfile", counting)
    data = np.random.default_rng(0).integers(0, 256, 20_000_000, dtype=np.uint8).tobytes()
    path = tmp_path / "big.bin"
    path.write_bytes(data)

    with serving_aiohttp(file_middle(path, data)) as url, socket.socket() as sock:
        # A small receive buffer and no reading until the server waits: its first sendfile
        # must stop short of the body, however fast this machine drains sockets.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect(("127.0.0.1", port_of(url)))
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 30
        while not rest and time.monotonic() < deadline:  # until the server waits for room
            time.sleep(0.01)
        reply, end = bytearray(), -1
        while end < 0 or len(reply) < end + 4 + len(data) - 2000:
            chunk = sock.recv(1 << 20)
            assert chunk, "connection closed early"
            reply += chunk
            end = reply.find(b"\r\n\r\n")
    head, _, body = bytes(reply).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == data[1000:-1000]
    [(offset, count)] = rest  # the part the socket did not take at once
    assert offset > 1000 and offset + count == len(data) - 1000


def test_a_client_gone_mid_body_is_logged_without_a_traceback(tmp_path, caplog):
    import socket
    import time

    data = bytes(range(256)) * 80_000  # 20 MB
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    with serving_aiohttp(file_middle(path, data)) as url:
        with socket.create_connection(("127.0.0.1", port_of(url))) as sock:
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        time.sleep(0.5)  # closed with a reset, 16+ MB still to send
        assert request(url, "GET", "/big")[2] == data[1000:-1000]  # the server is fine
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


@pytest.mark.parametrize("sent", [b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",  # idle after a response
                                  b"GET /a HTTP/1.1\r\nHost: x\r\n",  # headers never finished
                                  b""])  # nothing sent at all
def test_idle_and_slow_connections_are_closed_after_keep_alive(sent):
    """The keep-alive time (``keep_alive_s``, aiohttp's ``keepalive_timeout``) also bounds a client
    that never finishes its headers: no connection is held open by a silent client."""
    import socket
    import time

    async def hello(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with (serving_aiohttp(hello, keep_alive_s=0.5) as url,
          socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as sock):
        sock.sendall(sent)
        if sent.endswith(b"\r\n\r\n"):
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # headers and body: one write
        start = time.monotonic()
        assert sock.recv(65536) == b""  # closed by the server, well before the 10 s timeout
        assert time.monotonic() - start < 5


def test_zerocopysend_keeps_the_http_framing(tmp_path, caplog):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 400)
    data = path.read_bytes()
    # No Content-Length: chunked, so the file goes through aiohttp's chunk framing.
    with serving_aiohttp(file_app(path, length=None, count=50_000)) as url:
        status, headers, body = request(url, "GET", "/")
    assert status == 200 and headers["transfer-encoding"] == "chunked" and body == data[:50_000]
    # More bytes than declared: refused before any goes out (they would be read as the
    # next response on a kept-alive connection); the client sees the body cut short.
    with serving_aiohttp(file_app(path, length=100, count=50_000)) as url, pytest.raises(http.client.IncompleteRead):
        request(url, "GET", "/")
    assert "left of its Content-Length" in caplog.text


def test_a_body_shorter_than_declared_closes_the_connection(caplog):
    async def short(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
        await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with serving_aiohttp(short) as url, pytest.raises(http.client.IncompleteRead):
        request(url, "GET", "/")
    assert "90 bytes less than it declared" in caplog.text


def test_a_client_gone_while_sending_its_body_is_a_disconnect(caplog):
    import socket
    import threading

    seen, done = [], threading.Event()

    async def reader(scope, receive, send):
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        done.set()

    with serving_aiohttp(reader) as url:
        with socket.create_connection(("127.0.0.1", port_of(url))) as sock:
            sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"z" * 10_000)
            time.sleep(0.2)
        assert done.wait(10)
    assert seen[-1] == "http.disconnect" and "http.request" in seen
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
