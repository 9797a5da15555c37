"""shards.reader.Dataset over HTTP from a plain static server (no Range support)."""

from __future__ import annotations

import numpy as np

from shards.reader import Dataset
from tests.conftest import synthetic_images


def test_iterate_a_dataset_served_by_http_server(make_dataset, static_http):
    root = make_dataset("ds", n_train=40, n_test=10, shard_size=16)
    ds = Dataset(f"{static_http(root.parent)}/ds")
    train = ds.split("train")
    images = np.concatenate([b.images for b in train.iter_batches(16)])
    np.testing.assert_array_equal(images, synthetic_images(50)[:40])
    assert ds.split("test").labels.tolist() == [i % 10 for i in range(10)]


def test_a_dataset_on_s3_reads_through_the_fsspec_source(make_dataset, moto_s3):
    from shards.source import FsspecSource

    root = make_dataset("ds", n_train=40, n_test=10, shard_size=16, image_format="npy")
    ds = Dataset(moto_s3(root, "sets/ds"), storage_options=moto_s3.options)
    assert isinstance(ds.source, FsspecSource)
    train = ds.split("train")
    np.testing.assert_array_equal(np.concatenate([b.images for b in train.iter_batches(16)]),
                                  synthetic_images(50)[:40])
    np.testing.assert_array_equal(train.get("t000033").image, synthetic_images(50)[33])
    assert ds.split("test").keys[:2] == ["v000000", "v000001"]
