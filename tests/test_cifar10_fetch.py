"""The official CIFAR-10 archive, fetched as a user without it would: from a local HTTP server
that serves a small archive in the original format (URL and checksum overridden), with Range
for resumes, breaks in the middle, a wrong checksum and no network at all."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner

from cifar5m import Dataset
from cifar5m.cli.main import cli
from cifar5m.core.errors import DownloadError, OfflineError
from cifar5m.dataset_server.launcher import free_port
from cifar5m.shards.cifar10_archive import cache_dir, fetch_cifar10
from tests.test_import import write_python_batches


def archive_bytes(tmp_path: Path) -> bytes:
    base, _ = write_python_batches(tmp_path / "src")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        tar.add(base, arcname="cifar-10-batches-py")
    return out.getvalue()


class Archive(BaseHTTPRequestHandler):
    """Serves ``data`` at any path, with Range; ``cut`` ends the body after that many bytes
    (a reset mid-download) once, then serves whole answers."""

    data = b""
    cut: int | None = None
    ranges: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        start = 0
        spec = self.headers.get("Range")
        self.ranges.append(spec or "")
        if spec:
            start = int(spec.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}")
        else:
            self.send_response(200)
        body = self.data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut is not None:
            self.wfile.write(body[: type(self).cut])
            type(self).cut = None
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def archive_server(tmp_path: Path, monkeypatch) -> Iterator[type[Archive]]:
    handler = type("Handler", (Archive,), {"data": archive_bytes(tmp_path), "ranges": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("CIFAR5M_CIFAR10_URL", f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz")
    monkeypatch.setenv("CIFAR5M_CIFAR10_MD5", hashlib.md5(handler.data).hexdigest())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield handler
    server.shutdown()
    server.server_close()


def test_the_archive_is_fetched_once_into_the_user_cache(archive_server) -> None:
    path = fetch_cifar10(progress=False)
    assert path.parent == cache_dir() and path.read_bytes() == archive_server.data
    assert fetch_cifar10(progress=False) == path
    assert archive_server.ranges == [""]  # the second call asked nothing


def test_a_wrong_checksum_keeps_nothing(archive_server, monkeypatch) -> None:
    monkeypatch.setenv("CIFAR5M_CIFAR10_MD5", "0" * 32)
    with pytest.raises(DownloadError, match="not the published 0{32}; nothing was kept"):
        fetch_cifar10(progress=False)
    left = list(cache_dir().iterdir()) if cache_dir().exists() else []
    assert [p.name for p in left if not p.name.startswith(".cifar5m")] == []


def test_a_broken_download_resumes_where_it_stopped(archive_server) -> None:
    archive_server.cut = len(archive_server.data) // 2
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        fetch_cifar10(progress=False)
    part = cache_dir() / "cifar-10-python.tar.gz.part"
    assert part.stat().st_size == len(archive_server.data) // 2
    path = fetch_cifar10(progress=False)
    assert path.read_bytes() == archive_server.data and not part.exists()
    assert archive_server.ranges == ["", f"bytes={len(archive_server.data) // 2}-"]


def test_no_network_is_one_offline_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CIFAR5M_CIFAR10_URL", f"http://127.0.0.1:{free_port()}/cifar-10-python.tar.gz")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(OfflineError, match="cannot reach http://127.0.0.1"):
        fetch_cifar10(progress=False)


def test_import_cifar10_fetches_and_imports_it(archive_server, tmp_path) -> None:
    result = CliRunner().invoke(cli, ["import", "cifar10", "--out", str(tmp_path / "c10")])
    assert result.exit_code == 0, result.output
    ds = Dataset(tmp_path / "c10")
    assert len(ds.split("train")) == 20 and len(ds.split("test")) == 4
