"""Shared fixtures: small synthetic datasets written with the real writer."""

from __future__ import annotations

import functools
import os
import threading
import urllib.request
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cifar5m.shards.synthetic import write_synthetic_dataset

# CIFAR-10 as a JPEG tarball, passed in by CIFAR10=PATH (.ci/run does); tests that need it skip
# without it.
CIFAR10_JPEG = Path(os.environ["CIFAR10"]) if os.environ.get("CIFAR10") else None


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """``make_dataset(name="ds", **write_dataset_kwargs)`` -> path of a finished dataset."""

    def make(name: str = "ds", **kwargs) -> Path:
        return write_synthetic_dataset(tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def cifar10_jpeg() -> Path:
    if CIFAR10_JPEG is None or not CIFAR10_JPEG.is_file():
        pytest.skip(f"CIFAR-10 not given ({CIFAR10_JPEG or 'set CIFAR10=path/to/cifar10-jpeg.tar.gz'})")
    return CIFAR10_JPEG


class QuietHTTPHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def static_http() -> Iterator[Callable[[Path], str]]:
    """``python -m http.server`` (no Range support) on 127.0.0.1: ``static_http(root) -> url``."""
    servers = []

    def serve(root: Path) -> str:
        handler = functools.partial(QuietHTTPHandler, directory=str(root))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def moto_s3():
    """moto's S3 server on 127.0.0.1 with an empty bucket ``bucket``.

    Yields ``upload(root, prefix) -> url`` (copies a dataset directory there and returns its
    ``s3://`` URL) with ``upload.options``: the fsspec storage options that reach it,
    ``upload.put(path, key)``: one file to ``key``, and ``upload.client``: boto3's client.
    """
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        # moto keeps its buckets per process, not per server: start each test with none
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30)
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                              aws_secret_access_key="test", region_name="us-east-1")
        client.create_bucket(Bucket="bucket")

        def upload(root: Path, prefix: str, *, bucket: str = "bucket") -> str:
            for path in Path(root).iterdir():
                if path.is_file():
                    client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
            return f"s3://{bucket}/{prefix}"

        upload.put = lambda path, key, bucket="bucket": client.upload_file(str(path), bucket, key)
        upload.client = client
        upload.options = {"key": "test", "secret": "test",
                          "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        yield upload
    finally:
        server.stop()
