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
