"""File bodies by sendfile and the connection handling around them, on the real app.

``FdResponse`` sends what the socket takes at once with ``os.sendfile``, the rest with
asyncio's ``loop.sendfile``, and copies through Python where the loop has none; the
bytes are the file's whichever path sent them. Clients that go away, stay idle or
never finish their headers cost no traceback and no held connection. ``Library.get``
reuses a passed dataset check only within the age it is given.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cifar5m.dataset_server.app import create_app
from cifar5m.dataset_server.repo import Library
from tests.test_server_support import build_root, request, serving

DS = "/datasets/lab/ds/resolve/main"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.fixture
def big_shard(make_dataset, tmp_path):
    """A root whose ``train-000000.tar`` is 20 MB of random bytes (served with its own hash)."""
    root = build_root(make_dataset, tmp_path / "root", n_train=20, n_test=10, shard_size=10)
    data = np.random.default_rng(0).integers(0, 256, 20_000_000, dtype=np.uint8).tobytes()
    (root / "lab/ds/train-000000.tar").write_bytes(data)
    return root, data


def test_concurrent_whole_files_and_ranges_are_exact(make_dataset, tmp_path):
    root = build_root(make_dataset, tmp_path / "root", n_train=200, n_test=50, shard_size=20)
    files = {p.name: p.read_bytes() for p in (root / "lab/ds").glob("*.tar")}
    names = sorted(files) * 4
    with serving(create_app(root=root)) as url:
        def whole(name):
            status, headers, body = request(url, "GET", f"{DS}/{name}")
            return status == 200 and body == files[name] and headers["content-length"] == str(len(body))

        def part(name):
            status, _, body = request(url, "GET", f"{DS}/{name}", headers={"Range": "bytes=100-5099"})
            return status == 206 and body == files[name][100:5100]

        with ThreadPoolExecutor(32) as pool:
            assert all(pool.map(whole, names)) and all(pool.map(part, names))
        status, headers, body = request(url, "HEAD", f"{DS}/{names[0]}")
        assert status == 200 and body == b"" and headers["content-length"] == str(len(files[names[0]]))


def test_files_are_copied_where_the_event_loop_has_no_sendfile(big_shard, monkeypatch):
    async def no_sendfile(*args, **kwargs):
        raise NotImplementedError  # as uvloop's loop.sendfile

    monkeypatch.setattr(asyncio.BaseEventLoop, "sendfile", no_sendfile)
    root, data = big_shard
    with serving(create_app(root=root)) as url:
        whole = request(url, "GET", f"{DS}/train-000000.tar")
        part = request(url, "GET", f"{DS}/train-000000.tar", headers={"Range": "bytes=7-5000006"})
    assert (whole[0], whole[2]) == (200, data) and (part[0], part[2]) == (206, data[7:5000007])


def test_a_body_bigger_than_the_socket_buffer_is_sent_whole(big_shard, monkeypatch):
    """The first os.sendfile fills the send buffer; asyncio's sendfile sends the rest as
    the client reads."""
    rest = []
    original = asyncio.BaseEventLoop.sendfile

    async def counting(self, transport, file, offset=0, count=None, **kwargs):
        rest.append((offset, count))
        return await original(self, transport, file, offset, count, **kwargs)

    monkeypatch.setattr(asyncio.BaseEventLoop, "sendfile", counting)
    root, data = big_shard
    with serving(create_app(root=root)) as url, socket.socket() as sock:
        # A small receive buffer and no reading until the server waits: its first sendfile
        # must stop short of the body, however fast this machine drains sockets.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect(("127.0.0.1", port_of(url)))
        sock.sendall(f"GET {DS}/train-000000.tar HTTP/1.1\r\nHost: x\r\nRange: bytes=1000-\r\n\r\n".encode())
        deadline = time.monotonic() + 30
        while not rest and time.monotonic() < deadline:  # until the server waits for room
            time.sleep(0.01)
        reply, end = bytearray(), -1
        while end < 0 or len(reply) < end + 4 + len(data) - 1000:
            chunk = sock.recv(1 << 20)
            assert chunk, "connection closed early"
            reply += chunk
            end = reply.find(b"\r\n\r\n")
    head, _, body = bytes(reply).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 206") and body == data[1000:]
    [(offset, count)] = rest  # the part the socket did not take at once
    assert offset > 1000 and offset + count == len(data)


def test_a_client_gone_mid_body_is_logged_without_a_traceback(big_shard, caplog):
    root, data = big_shard
    with caplog.at_level(logging.DEBUG), serving(create_app(root=root)) as url:
        with socket.create_connection(("127.0.0.1", port_of(url))) as sock:
            sock.sendall(f"GET {DS}/train-000000.tar HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        time.sleep(0.5)  # closed with a reset, 16+ MB still to send
        assert request(url, "GET", f"{DS}/train-000000.tar")[2] == data  # the server is fine
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize("sent", [b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",  # idle after a response
                                  b"GET /healthz HTTP/1.1\r\nHost: x\r\n",  # headers never finished
                                  b""])  # nothing sent at all
def test_idle_and_slow_connections_are_closed_after_keep_alive(make_dataset, tmp_path, sent):
    """The keep-alive time (aiohttp's ``keepalive_timeout``) also bounds a client that never
    finishes its headers: no connection is held open by a silent client."""
    root = build_root(make_dataset, tmp_path / "root", n_train=10, n_test=0)
    with (serving(create_app(root=root), keep_alive_s=0.5) as url,
          socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as sock):
        sock.sendall(sent)
        if sent.endswith(b"\r\n\r\n"):
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # headers and body: one write
        start = time.monotonic()
        assert sock.recv(65536) == b""  # closed by the server, well before the 10 s timeout
        assert time.monotonic() - start < 5


def test_requests_past_the_concurrency_bound_get_503_and_head_leaves_the_connection_usable(make_dataset, tmp_path):
    root = build_root(make_dataset, tmp_path / "root", n_train=10, n_test=0)
    with serving(create_app(root=root, limit_concurrency=0)) as url:
        status, headers, _ = request(url, "GET", f"{DS}/README.md")
        assert (status, headers["x-error-message"]) == (503, "server busy, retry later")
    with serving(create_app(root=root)) as url:
        conn = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=30)
        conn.request("HEAD", f"{DS}/train-000000.tar")
        head = conn.getresponse()
        assert (head.status, head.read()) == (200, b"")
        conn.request("GET", f"{DS}/README.md")  # the same connection: no stray body bytes
        assert conn.getresponse().read() == (root / "lab/ds/README.md").read_bytes()
        conn.close()


def test_dataset_checks_are_reused_only_within_max_age(make_dataset, tmp_path):
    root = build_root(make_dataset, tmp_path / "root", n_train=10, n_test=0)
    library = Library(root)
    repo = library.get("lab", "ds", max_age=60.0)
    assert repo is not None
    (root / "lab" / "ds" / "manifest.json").rename(tmp_path / "gone.json")  # no longer finished
    assert library.get("lab", "ds", max_age=60.0) is repo  # file requests: within the scan age
    assert library.get("lab", "ds") is None  # API calls (max_age 0) check again
    assert library.get("lab", "ds", max_age=60.0) is None  # a failed check is not reused


def test_file_requests_join_the_scan_in_flight_and_api_calls_scan_afresh(make_dataset, tmp_path, monkeypatch):
    from cifar5m.dataset_server.auth import AccessPolicy
    from cifar5m.dataset_server.config import ServeConfig
    from cifar5m.dataset_server.context import ServerContext, state_at

    root = build_root(make_dataset, tmp_path / "root", n_train=10, n_test=0)
    library = Library(root)
    repo = library.get("lab", "ds")
    ctx = ServerContext(library, AccessPolicy(), ServeConfig(root=str(root)))
    scans = []
    real_scan = repo.scan

    def slow_scan():
        scans.append(1)
        time.sleep(0.05)  # long enough for every request below to find it in flight
        return real_scan()

    monkeypatch.setattr(repo, "scan", slow_scan)

    async def many(max_age: float) -> set[str]:
        states = await asyncio.gather(*(state_at(repo, "main", max_age=max_age, ctx=ctx) for _ in range(20)))
        return {s.sha for s in states}

    assert len(asyncio.run(many(60.0))) == 1 and len(scans) == 1  # nothing cached: one scan for all 20
    assert ctx.scans == {}  # forgotten once done
    repo._state = None
    scans.clear()
    assert len(asyncio.run(many(0.0))) == 1 and len(scans) == 20  # max_age 0 (API calls): each its own


def test_api_calls_re_check_every_file_inline_and_see_each_change_at_once(make_dataset, tmp_path, monkeypatch):
    """API calls skip the scan (and its thread) while every file is as the last scan saw it,
    and see a change made on disk on the very next call, with no wait: an in-place edit, a
    deleted file, a rewritten manifest, a new dataset."""
    import hashlib
    import json
    import os

    from cifar5m.dataset_server.repo import DatasetRepo

    root = build_root(make_dataset, tmp_path / "root", n_train=30, n_test=0, shard_size=10)
    ds = root / "lab/ds"
    scans = []
    real_scan = DatasetRepo.scan

    def counted(self):
        scans.append(self.repo_id)
        return real_scan(self)

    monkeypatch.setattr(DatasetRepo, "scan", counted)

    def api(path: str, body: bytes | None = None):
        status, headers, data = request(
            url, "POST" if body is not None else "GET", path, body=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"} if body is not None else None)
        assert status == 200, data
        assert headers["content-type"] == "application/json; charset=utf-8"
        return json.loads(data)

    def tree() -> dict[str, dict]:
        return {e["path"]: e for e in api("/api/datasets/lab/ds/tree/main")}

    with serving(create_app(root=root)) as url:
        first = api("/api/datasets/lab/ds")
        assert len(scans) == 1
        for _ in range(3):  # unchanged: the same answer, no scan
            assert api("/api/datasets/lab/ds") == first
            assert set(tree()) == {s["rfilename"] for s in first["siblings"]}
            assert [e["path"] for e in api("/api/datasets/lab/ds/paths-info/main",
                                           b"paths=README.md&paths=nope&paths=train-000001.tar")] == \
                ["README.md", "train-000001.tar"]
        assert len(scans) == 1

        # In place, no manifest change, no directory change: seen by the next call.
        (ds / "README.md").write_text((ds / "README.md").read_text() + "\nmore\n")
        second = api("/api/datasets/lab/ds")
        assert second["sha"] != first["sha"] and len(scans) == 2
        assert tree()["README.md"]["size"] == (ds / "README.md").stat().st_size
        shard = ds / "train-000001.tar"
        data = bytearray(shard.read_bytes())
        data[700] ^= 0xFF
        shard.write_bytes(bytes(data))
        entry = api("/api/datasets/lab/ds/paths-info/main", b"paths=train-000001.tar")[0]
        assert entry["lfs"]["oid"] == hashlib.sha256(bytes(data)).hexdigest() and len(scans) == 3
        third = api("/api/datasets/lab/ds")["sha"]
        assert third != second["sha"]

        shard.unlink()  # deleted: gone from the very next answer
        assert "train-000001.tar" not in tree()
        shard.write_bytes(bytes(data))  # back (a listed file that was missing appears again)
        assert "train-000001.tar" in tree()

        # The manifest replaced by an identical copy (new inode): re-scanned, same commit.
        copy = tmp_path / "m.json"
        copy.write_bytes((ds / "manifest.json").read_bytes())
        os.utime(copy, ns=((ds / "manifest.json").stat().st_atime_ns, (ds / "manifest.json").stat().st_mtime_ns))
        before = len(scans)
        os.replace(copy, ds / "manifest.json")
        assert api("/api/datasets/lab/ds")["sha"] == api("/api/datasets/lab/ds")["sha"]
        assert len(scans) == before + 1

        # A new dataset written under the root: listed and answered at once.
        build_root(make_dataset, root, repo_ids=("lab/new",), n_train=10, n_test=0)
        assert "lab/new" in {d["id"] for d in api("/api/datasets")}
        assert api("/api/datasets/lab/new")["id"] == "lab/new"


def test_a_symlinked_file_always_takes_the_scan(make_dataset, tmp_path):
    """A symlink inside the dataset may be re-pointed without any lstat of it changing in a
    way the inline check trusts: such a dataset is never re-checked inline."""
    root = build_root(make_dataset, tmp_path / "root", n_train=10, n_test=0)
    ds = root / "lab/ds"
    repo = Library(root).get("lab", "ds")
    assert repo.revalidated() is None  # nothing scanned yet
    repo.scan()
    assert repo.revalidated() is not None
    (ds / "README.md").rename(ds / "card.md")
    (ds / "README.md").symlink_to("card.md")
    assert repo.revalidated() is None  # changed (a symlink now)
    state = repo.scan()
    assert "README.md" in state.files and state.checks is None
    assert repo.revalidated() is None
