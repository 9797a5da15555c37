"""cifar5m.train.stream over HTTP (two static servers on 127.0.0.1) and S3 (moto's server).

Each must deliver exactly the batches (keys, pixels, labels) a local directory gives.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch

from cifar5m.core.errors import CorruptShardError, DatasetNotFoundError, DownloadError
from cifar5m.shards.synthetic import write_synthetic_dataset
from cifar5m.train.stream import SampleStream, StreamConfig
from tests.test_server_support import serving as serve_app


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("remote") / "ds", n_train=150, n_test=10,
                         shard_size=40, image_format="png")


@pytest.fixture(scope="module")
def range_http(dataset):
    """aiohttp's static files (answers Range with 206), on 127.0.0.1."""
    from aiohttp import web

    app = web.Application()
    app.router.add_static("/data", str(dataset.parent))
    with serve_app(app) as url:
        yield f"{url}/data/{dataset.name}"


def test_cifar5m_serve_resolve_urls_deliver_the_local_batches(dataset, tmp_path):
    """`cifar5m serve` (dataset_server) exposes a dataset's files under .../resolve/main."""
    app_module = pytest.importorskip("cifar5m.dataset_server.app")
    shutil.copytree(dataset, tmp_path / "lab" / "ds")
    with serve_app(app_module.create_app(root=tmp_path)) as url:
        assert_same(batches(f"{url}/datasets/lab/ds/resolve/main"), batches(str(dataset)))


def batches(source: str, **kw) -> list:
    cfg = dict(source=source, batch_size=24, seed=3, return_keys=True, rank=1, world_size=2, **kw)
    return [(b.step, b.keys, b.images, b.labels) for b in SampleStream(StreamConfig(**cfg))]


def assert_same(got: list, ref: list) -> None:
    assert len(got) == len(ref) == 6
    for (s1, k1, i1, l1), (s2, k2, i2, l2) in zip(got, ref, strict=True):
        assert s1 == s2 and k1 == k2 and torch.equal(i1, i2) and torch.equal(l1, l2)


def test_http_range_server_delivers_the_local_batches(dataset, range_http, tmp_path):
    ref = batches(str(dataset))
    assert_same(batches(range_http), ref)
    assert_same(batches(range_http, cache_dir=str(tmp_path / "cache")), ref)  # whole-shard GETs
    assert_same(batches(range_http, num_workers=2), ref)
    # tiny blocks: 38 blocks but only 16 kept, so the lookahead evicts and refetches
    small = dict(block=4, window=64)
    assert_same(batches(range_http, **small), batches(str(dataset), **small))


def test_real_world_subset_over_http_equals_local(dataset, range_http):
    cfg = dict(world="real", n=37, batch_size=8, steps=10, seed=1, return_keys=True)
    local = SampleStream(StreamConfig(source=str(dataset), **cfg))
    remote = SampleStream(StreamConfig(source=range_http, **cfg))
    for a, b in zip(local.real_subset(), remote.real_subset(), strict=True):
        assert a == b if isinstance(a, list) else torch.equal(a, b)
    assert [b.keys for b in local] == [b.keys for b in remote]


def test_plain_http_server_without_range_support_works(dataset, static_http):
    assert_same(batches(static_http(dataset)), batches(str(dataset)))


def test_http_truncated_shard_and_missing_dataset(tmp_path, static_http):
    root = write_synthetic_dataset(tmp_path / "ds", n_train=60, n_test=3, shard_size=30, image_format="png")
    shard = root / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    url = static_http(root)
    stream = SampleStream(StreamConfig(source=url, batch_size=60))
    with pytest.raises(CorruptShardError, match=r"train-000000\.tar is truncated: sample .* at byte offset \d+"):
        list(stream)
    from aiohttp import web

    app = web.Application()
    app.router.add_static("/", str(root))
    with serve_app(app) as ranged:
        stream = SampleStream(StreamConfig(source=ranged, batch_size=60))  # block reads: 206/416
        with pytest.raises(CorruptShardError, match=r"train-000000\.tar is truncated: sample"):
            list(stream)
    with pytest.raises(DatasetNotFoundError, match="no manifest.json"):
        SampleStream(StreamConfig(source=url + "/nothing-here"))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/ds"
    with pytest.raises(DownloadError, match="is the server up"):
        SampleStream(StreamConfig(source=dead))


def test_s3_through_moto_delivers_the_local_batches(dataset, moto_s3):
    from click.testing import CliRunner

    from cifar5m.cli.main import cli

    url, options = moto_s3(dataset, "sets/ds"), moto_s3.options
    ref = batches(str(dataset))
    assert_same(batches(url, storage_options=options), ref)
    assert_same(batches(url, storage_options=options, num_workers=2), ref)
    result = CliRunner().invoke(cli, ["stream", url, "--batch-size", "30",
                                      "--storage-options", json.dumps(options), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["exactly_once"] is True
