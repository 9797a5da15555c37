"""Shared fixtures: small synthetic datasets written with the real writer."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from cifar5m.shards.writer import DatasetWriter, Sample

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR10_JPEG = SHARED_DATA / "cifar10-jpeg.tar.gz"


def synthetic_images(n: int, *, seed: int = 0) -> np.ndarray:
    """Smooth-ish random 32x32 RGB images (compress like photos, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)


def write_dataset(
    root: Path,
    *,
    n_train: int = 200,
    n_test: int = 50,
    shard_size: int = 64,
    image_format: str = "png",
    seed: int = 0,
) -> Path:
    """Write a dataset whose train keys are ``t000000..`` and test keys ``v000000..``.

    Image i of train is ``synthetic_images(n_train + n_test, seed)[i]``, label ``i % 10``;
    test images follow the train ones in the same array.
    """
    images = synthetic_images(n_train + n_test, seed=seed)
    with DatasetWriter(root, fingerprint={"test": seed}, image_format=image_format,
                       shard_size=shard_size, provenance={"source": "synthetic test data"}) as w:
        for i in range(n_train):
            w.add("train", Sample(f"t{i:06d}", images[i], i % 10, confidence=0.9, seed=i))
        for j in range(n_test):
            w.add("test", Sample(f"v{j:06d}", images[n_train + j], j % 10))
    return root


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """``make_dataset(name="ds", **write_dataset_kwargs)`` -> path of a finished dataset."""

    def make(name: str = "ds", **kwargs) -> Path:
        return write_dataset(tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def cifar10_jpeg() -> Path:
    if not CIFAR10_JPEG.is_file():
        pytest.skip(f"{CIFAR10_JPEG} not found (the shared CIFAR-10 copy)")
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
    ``s3://`` URL) with ``upload.options``: the fsspec storage options that reach it.
    """
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                              aws_secret_access_key="test", region_name="us-east-1")
        client.create_bucket(Bucket="bucket")

        def upload(root: Path, prefix: str) -> str:
            for path in Path(root).iterdir():
                if path.is_file():
                    client.upload_file(str(path), "bucket", f"{prefix}/{path.name}")
            return f"s3://bucket/{prefix}"

        upload.options = {"key": "test", "secret": "test",
                          "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        yield upload
    finally:
        server.stop()
