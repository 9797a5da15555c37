"""cifar5m.shards.source (local pread/mmap reads, HTTP without Range) and cifar5m.shards.connections (the
keep-alive GET client): the byte source every reader of a dataset reads through."""

from __future__ import annotations

import functools
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from cifar5m.shards.connections import Connections, Piece
from cifar5m.shards.source import GAP, LocalSource, coalesce
from cifar5m.shards.synthetic import write_synthetic_dataset
from tests.conftest import QuietHTTPHandler


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("remote") / "ds", n_train=150, n_test=10,
                         shard_size=40, image_format="png")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    peers: ClassVar[set] = set()
    authorizations: ClassVar[list] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.peers.add(self.client_address)
        self.authorizations.append(self.headers.get("Authorization"))
        if self.path.startswith("/away/"):  # to another host (port): a signed object-store URL
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.path[6:]}/data")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/data")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = bytes(range(256)) * 4
        first, last = (int(x) for x in self.headers["Range"][6:].split("-"))
        self.send_response(206)
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        self.wfile.write(body[first : last + 1])


def test_connections_keep_alive_read_into_buffer_and_follow_redirects():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        http = Connections()
        into = memoryview(bytearray(100))
        for start in range(0, 40, 10):
            piece = Piece(start, into[:10])
            reply = http.get_range(f"{url}/data", {}, [piece])
            assert reply.status == 206 and bytes(piece.data()) == bytes(range(start, start + 10))
            assert np.shares_memory(np.frombuffer(piece.data(), np.uint8), np.frombuffer(into, np.uint8))
        # one request, two parts with 5 skipped bytes between them, each into its own view
        pieces = [Piece(100, memoryview(bytearray(8))), Piece(113, memoryview(bytearray(8)))]
        http.get_range(f"{url}/data", {}, pieces)
        assert [bytes(p.data()) for p in pieces] == [bytes(range(100, 108)), bytes(range(113, 121))]
        piece = Piece(1000, memoryview(bytearray(24)))
        reply = http.get_range(f"{url}/moved", {}, [piece])  # a redirect followed
        assert reply.status == 206 and bytes(piece.data()) == bytes(range(232, 256))
        assert len(_Handler.peers) == 1  # one connection for all six requests
    finally:
        server.shutdown()
        server.server_close()


def test_connections_send_no_authorization_to_another_host_after_a_redirect():
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Handler) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    first, other_port = f"http://127.0.0.1:{servers[0].server_address[1]}", servers[1].server_address[1]
    try:
        http, auth = Connections(), {"Authorization": "Bearer t0ken", "Range": "bytes=0-9"}
        _Handler.authorizations.clear()
        assert bytes(http.get(f"{first}/moved", auth).body) == bytes(range(10))  # same host: kept
        assert bytes(http.get(f"{first}/away/{other_port}", auth).body) == bytes(range(10))
        assert _Handler.authorizations == ["Bearer t0ken", "Bearer t0ken", "Bearer t0ken", None]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_local_fetch_into_lands_in_the_buffer_given_and_is_short_at_the_end(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n_train=40, n_test=2, shard_size=20, image_format="npy")
    source = LocalSource(root)
    data = (root / "train-000000.tar").read_bytes()
    out = memoryview(bytearray(1000))
    got = source.fetch_into([("train-000000.tar", 100, 600),
                             ("train-000000.tar", len(data) - 10, len(data) + 50)], [out, None])
    assert bytes(got[0]) == data[100:600] and got[0].obj is out.obj  # landed in the buffer given
    assert bytes(got[1]) == data[-10:]  # short at the end of the file: the caller reports it


def test_server_without_range_support_gets_each_file_once_under_concurrency(dataset):
    from collections import Counter

    from cifar5m.shards.http_source import HttpSource

    gets: Counter = Counter()

    class Counting(QuietHTTPHandler):
        def do_GET(self) -> None:
            gets[self.path] += 1
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Counting, directory=str(dataset)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        source = HttpSource(f"http://127.0.0.1:{server.server_address[1]}")
        source.fetch([("manifest.json", 0, 10)])  # learns that Range is ignored
        shards = sorted(p.name for p in dataset.glob("train-*.tar"))
        # ranges > GAP apart: several jobs per file, run by 8 pool threads at once
        wanted = [(f, a, a + 100) for f in shards for a in range(0, 150_000, 70_000)]
        got = source.fetch(wanted)
    finally:
        server.shutdown()
        server.server_close()
    for (file, a, b), data in zip(wanted, got, strict=True):
        assert bytes(data) == (dataset / file).read_bytes()[a:b]
    assert {f"/{f}": gets[f"/{f}"] for f in shards} == {f"/{f}": 1 for f in shards}


def test_coalesce_merges_a_block_but_never_reads_more_skipped_bytes_than_wanted() -> None:
    # a block of tar members: 512-byte headers between 5,120-byte samples, one request
    block = [(k * 5632 + 512, (k + 1) * 5632) for k in range(256)]
    assert [(a, b, len(m)) for a, b, m in coalesce(block)] == [(512, 256 * 5632, 256)]
    # scattered samples 30 KB apart: under GAP, but each gap is 6x the sample: not merged
    scattered = [(k * 36_000, k * 36_000 + 5120) for k in range(50)]
    assert len(coalesce(scattered)) == 50
    # any layout: the bytes requested stay within 2x the bytes wanted (plus a page per gap)
    rng = np.random.default_rng(0)
    starts = np.sort(rng.choice(50_000_000, 2_000, replace=False))
    ranges = [(int(a), int(a) + int(rng.integers(100, 6000))) for a in starts]
    groups = coalesce(ranges)
    wanted = sum(b - a for a, b in ranges)
    asked = sum(b - a for a, b, _ in groups)
    assert asked <= 2 * wanted + 4096 * len(ranges)
    assert sorted(i for _, _, m in groups for i in m) == list(range(len(ranges)))
    # ranges much bigger than their gaps still merge up to GAP
    assert len(coalesce([(0, 100_000), (100_000 + GAP, 300_000)])) == 1
    assert len(coalesce([(0, 100_000), (100_001 + GAP, 300_000)])) == 2


def test_a_local_source_nobody_holds_closes_its_descriptors(tmp_path: Path) -> None:
    import gc
    import os

    for i in range(3):
        (tmp_path / f"f{i}").write_bytes(bytes(range(256)) * 4)
    before = len(os.listdir("/proc/self/fd"))
    source = LocalSource(tmp_path)
    outs = [memoryview(bytearray(8)) for _ in range(3)]
    got = source.fetch_into([(f"f{i}", 16, 24) for i in range(3)], outs)
    assert [bytes(g) for g in got] == [bytes(range(16, 24))] * 3
    assert len(os.listdir("/proc/self/fd")) == before + 3
    del source, got
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
