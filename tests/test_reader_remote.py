"""cifar5m.shards.reader.Dataset over HTTP from a plain static server (no Range support)."""

from __future__ import annotations

import numpy as np

from cifar5m.shards.reader import Dataset
from cifar5m.shards.synthetic import synthetic_images


def test_iterate_a_dataset_served_by_http_server(make_dataset, static_http):
    root = make_dataset("ds", n_train=40, n_test=10, shard_size=16)
    ds = Dataset(f"{static_http(root.parent)}/ds")
    train = ds.split("train")
    images = np.concatenate([b.images for b in train.iter_batches(16)])
    np.testing.assert_array_equal(images, synthetic_images(50)[:40])
    assert ds.split("test").labels.tolist() == [i % 10 for i in range(10)]


def test_a_dataset_on_s3_reads_through_the_fsspec_source(make_dataset, moto_s3):
    from cifar5m.shards.source import FsspecSource

    root = make_dataset("ds", n_train=40, n_test=10, shard_size=16, image_format="npy")
    ds = Dataset(moto_s3(root, "sets/ds"), storage_options=moto_s3.options)
    assert isinstance(ds.source, FsspecSource)
    train = ds.split("train")
    np.testing.assert_array_equal(np.concatenate([b.images for b in train.iter_batches(16)]),
                                  synthetic_images(50)[:40])
    np.testing.assert_array_equal(train.get("t000033").image, synthetic_images(50)[33])
    assert ds.split("test").keys[:2] == ["v000000", "v000001"]


def test_verify_reads_through_the_same_source_over_http(make_dataset, tmp_path, static_http):
    """``cifar5m verify`` on the project's server (and a plain static one) gives the local
    report; a damaged or missing shard is named by its URL. ``describe`` (info) too."""
    import pytest
    from click.testing import CliRunner

    from cifar5m.cli.main import cli
    from cifar5m.core.errors import ChecksumMismatchError, ShardNotFoundError
    from cifar5m.dataset_server.app import create_app
    from cifar5m.shards.stats import describe
    from cifar5m.shards.verify import verify_dataset
    from tests.test_server_support import build_root, serving

    root = build_root(make_dataset, tmp_path / "root", ("lab/ds", "lab/bad", "lab/gone"),
                      n_train=40, n_test=10, shard_size=16)
    local = verify_dataset(root / "lab/ds", decode=True, progress=False)
    shard = root / "lab/bad/train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    (root / "lab/gone/train-000002.tar").unlink()
    with serving(create_app(root=root)) as url:
        base = f"{url}/datasets/lab/{{}}/resolve/main"
        assert verify_dataset(base.format("ds"), decode=True, progress=False) == local
        info = describe(base.format("ds"))  # `cifar5m info` reads through the same source
        assert info.pop("path") == base.format("ds") and {**info, "path": "x"} == {**describe(root / "lab/ds"), "path": "x"}
        with pytest.raises(ChecksumMismatchError,
                           match=rf"{base.format('bad')}/train-000001.tar does not match its sha256"):
            verify_dataset(base.format("bad"), progress=False)
        with pytest.raises(ShardNotFoundError, match=rf"{base.format('gone')}/train-000002.tar is missing"):
            verify_dataset(base.format("gone"), progress=False)
        result = CliRunner().invoke(cli, ["verify", base.format("ds"), "--decode"])
        assert result.exit_code == 0 and "OK: 4 shards, 40 train, 10 test samples" in result.output
        result = CliRunner().invoke(cli, ["info", base.format("ds")])
        assert result.exit_code == 0 and "train: 40 samples in 3 shards" in result.output, result.output
    assert verify_dataset(f"{static_http(root / 'lab')}/ds", decode=True, progress=False) == local


def test_verify_a_dataset_on_s3(make_dataset, moto_s3):
    from cifar5m.shards.verify import verify_dataset

    root = make_dataset("ds", n_train=40, n_test=10, shard_size=16, image_format="npy")
    local = verify_dataset(root, decode=True, progress=False)
    assert verify_dataset(moto_s3(root, "sets/ds"), decode=True, progress=False,
                          storage_options=moto_s3.options) == local


def test_an_empty_range_is_no_request_and_keeps_range_reads(make_dataset, tmp_path):
    """``read_bytes(f, a, a)`` (or a start past the end) reads nothing: sent as ``bytes=a-(a-1)``
    the project's server answered the whole file, and the source then kept whole shards."""
    from cifar5m.dataset_server.app import create_app
    from tests.test_server_support import build_root, serving

    root = build_root(make_dataset, tmp_path / "root", ("lab/ds",), n_train=10, n_test=0, shard_size=16)
    with serving(create_app(root=root)) as url:
        ds = Dataset(f"{url}/datasets/lab/ds/resolve/main")
        shard = ds.manifest.shards[0].file
        assert bytes(ds.read_bytes(shard, 0, 10)) == (root / "lab/ds" / shard).read_bytes()[:10]
        assert bytes(ds.read_bytes(shard, 20, 20)) == b""
        assert bytes(ds.read_bytes(shard, 30, 20)) == b""
        assert ds.source._ranges is True and not ds.source._whole
