"""Faults on the way lose nothing: a 503, a reset or a stall mid-body and a short body are
retried, resumed where they stopped, and the stream still hands out every sample once.

``tests/fault_proxy.py`` sits between the client and ``cifar5m serve`` (or aiohttp's static
files) and injects the faults deterministically: every n-th ranged request, in turn.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from cifar5m.core.errors import DownloadError
from cifar5m.shards import connections
from cifar5m.shards.connections import Connections, Piece
from cifar5m.shards.reader import Dataset
from cifar5m.shards.synthetic import write_synthetic_dataset
from cifar5m.train.stream import SampleStream, StreamConfig
from tests.fault_proxy import FaultProxy
from tests.test_faults_read import error_line
from tests.test_stream_http import static_files


@pytest.fixture
def quick(monkeypatch):
    """Short backoff and stall timeout (the defaults are 0.1 s doubled and 60 s)."""
    monkeypatch.setattr(connections, "BACKOFF", 0.01)
    monkeypatch.setattr(connections, "TIMEOUT", 0.5)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An npy dataset behind ``cifar5m serve`` (its URL) and on disk."""
    from cifar5m.dataset_server.app import create_app
    from tests.test_server_support import serving

    root = tmp_path_factory.mktemp("serve")
    write_synthetic_dataset(root / "lab" / "ds", n_train=600, n_test=10, shard_size=100, image_format="npy")
    with serving(create_app(root=root)) as url:
        yield f"{url}/datasets/lab/ds/resolve/main", root / "lab" / "ds"


@pytest.mark.parametrize("fault", ["503", "reset", "short", "stall"])
def test_each_fault_is_retried_asking_only_for_what_is_missing(fault, served, quick):
    url, root = served
    data = (root / "train-000000.tar").read_bytes()
    with FaultProxy(url, every=1, faults=(fault,), limit=1) as proxy:
        piece = Piece(1000, memoryview(bytearray(300_000)))
        reply = Connections().get_range(proxy.url(url) + "/train-000000.tar", {}, [piece])
    assert reply.status == 206 and bytes(piece.data()) == data[1000:301_000]
    assert proxy.injected == {fault: 1}
    resumed = int(proxy.ranges[1].removeprefix("bytes=").split("-")[0])
    if fault == "503":
        assert proxy.ranges == ["bytes=1000-300999"] * 2  # nothing arrived: asked again whole
    else:  # half the body arrived: only the rest is asked for again (a reset may drop
        # what the kernel had not handed over yet)
        assert (resumed >= 1000 if fault == "reset" else resumed > 1000) and resumed < 301_000
        assert proxy.ranges[1] == f"bytes={resumed}-300999"


def test_a_multi_range_read_resumes_after_a_reset(served, quick):
    url, root = served
    data = (root / "train-000001.tar").read_bytes()
    wanted = [(a, a + 3000) for a in range(0, 300_000, 9000)]
    with FaultProxy(url, every=1, faults=("reset",), limit=1) as proxy:
        pieces = [Piece(a, memoryview(bytearray(b - a))) for a, b in wanted]
        reply = Connections().get_range(proxy.url(url) + "/train-000001.tar", {}, pieces, multi=True)
    assert reply.status == 206 and [bytes(p.data()) for p in pieces] == [data[a:b] for a, b in wanted]
    assert proxy.injected == {"reset": 1} and len(proxy.ranges) == 2
    assert len(proxy.ranges[1].split(",")) < len(wanted)  # the parts that arrived are not asked again


def stream(source: str, **kw) -> list:
    cfg = StreamConfig(source=source, batch_size=50, seed=3, return_keys=True, **kw)
    return [(b.keys, b.images) for b in SampleStream(cfg)]


def same(got: list, ref: list) -> bool:
    return len(got) == len(ref) > 0 and all(
        k1 == k2 and torch.equal(i1, i2) for (k1, i1), (k2, i2) in zip(got, ref, strict=True))


@pytest.mark.parametrize("server", ["cifar5m", "static"])
def test_stream_and_dataset_lose_nothing_behind_faults(server, served, quick):
    url, root = served
    static = static_files(root) if server == "static" else None
    upstream = static.__enter__() if static else url
    try:
        with FaultProxy(upstream, every=3) as proxy:
            through = proxy.url(upstream)
            ideal = stream(through, block=64)  # blocks of 64 samples: several requests per shard
            keys = [k for ks, _ in ideal for k in ks]
            assert len(keys) == len(set(keys)) == 600  # exactly once
            assert same(ideal, stream(str(root), block=64))
            assert same(stream(through, world="real", n=200), stream(str(root), world="real", n=200))
            split, local = Dataset(through).split("train"), Dataset(root).split("train")
            for key in ("t000005", "t000321", "t000599"):
                assert np.array_equal(split.get(key).image, local.get(key).image)
    finally:
        if static:
            static.__exit__(None, None, None)
    assert set(proxy.injected) == {"503", "reset", "short", "stall"}


def test_cifar5m_stream_through_faults_and_when_retries_run_out(served):
    url, _ = served
    cmd = [sys.executable, "-m", "cifar5m", "stream", "--batch-size", "50"]
    with FaultProxy(url, every=1, faults=("503", "reset", "short"), limit=3) as proxy:
        run = subprocess.run([*cmd, proxy.url(url)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "exactly-once: OK" in run.stdout + run.stderr, run.stderr
    assert set(proxy.injected) == {"503", "reset", "short"}
    with FaultProxy(url, every=1, faults=("503",)) as proxy:  # every sample read fails
        run = subprocess.run([*cmd, proxy.url(url)], capture_output=True, text=True, timeout=120)
    line = error_line(run.returncode, run.stderr)
    assert proxy.url(url) in line and "train-0000" in line and "failed after 6 tries: HTTP 503" in line
    assert " (bytes " in line


def test_retries_run_out_into_one_error_naming_url_and_range(served, quick):
    url, _ = served
    with FaultProxy(url, every=1, faults=("short",)) as proxy:
        target = proxy.url(url) + "/train-000002.tar"
        with pytest.raises(DownloadError) as info:
            Connections().get_range(target, {}, [Piece(512, memoryview(bytearray(10_000)))])
    message = str(info.value)
    assert message.startswith(f"GET {target} (bytes ") and "-10511) failed after 6 tries" in message
    assert "\n" not in message and proxy.injected == {"short": 6}


def test_s3_through_faults_delivers_the_local_batches(served, moto_s3, quick):
    """moto behind the proxy: botocore/s3fs retry a 503 SlowDown; a reset or a short body
    that reaches the source is asked for again (``FsspecSource``)."""
    _, root = served
    url = moto_s3(root, "sets/ds")
    endpoint = moto_s3.options["client_kwargs"]["endpoint_url"]
    with FaultProxy(endpoint, every=2, faults=("503", "reset", "short")) as proxy:
        options = {**moto_s3.options, "client_kwargs": {"endpoint_url": proxy.url(endpoint).rstrip("/"),
                                                         "region_name": "us-east-1"}}
        got = stream(url, block=64, storage_options=options)
    assert same(got, stream(str(root), block=64))
    assert set(proxy.injected) == {"503", "reset", "short"}
