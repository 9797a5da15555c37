"""shards.reader.Dataset over HTTP from a plain static server (no Range support)."""

from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import pytest

from shards.reader import Dataset
from tests.conftest import synthetic_images


@pytest.fixture
def static_server(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_iterate_a_dataset_served_by_http_server(make_dataset, static_server):
    make_dataset("ds", n_train=40, n_test=10, shard_size=16)
    ds = Dataset(f"{static_server}/ds")
    train = ds.split("train")
    images = np.concatenate([b.images for b in train.iter_batches(16)])
    np.testing.assert_array_equal(images, synthetic_images(50)[:40])
    assert ds.split("test").labels.tolist() == [i % 10 for i in range(10)]
