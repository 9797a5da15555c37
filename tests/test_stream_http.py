"""npy shards over HTTP (arena gather, reads into slots); the byte source and its HTTP
client are tested in test_source.py."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cifar5m.core.errors import CorruptShardError
from cifar5m.shards.catalog import Catalog
from cifar5m.shards.source import LocalSource
from cifar5m.shards.synthetic import write_synthetic_dataset
from cifar5m.train.blocks import BlockStore
from cifar5m.train.sample_reader import SampleReader
from cifar5m.train.stream import SampleStream, StreamConfig
from tests.test_stream_remote import serve_app


def static_files(root):
    """aiohttp's static files of ``root`` (Range answered with 206/416) on 127.0.0.1."""
    from aiohttp import web

    app = web.Application()
    app.router.add_static("/", str(root))
    return serve_app(app)


def batches(source: str, **kw) -> list:
    cfg = dict(source=source, batch_size=20, seed=5, return_keys=True, **kw)
    return [(b.step, b.keys, b.images, b.labels) for b in SampleStream(StreamConfig(**cfg))]


def assert_same(got: list, ref: list) -> None:
    assert len(got) == len(ref) > 0
    for (s1, k1, i1, l1), (s2, k2, i2, l2) in zip(got, ref, strict=True):
        assert s1 == s2 and k1 == k2 and torch.equal(i1, i2) and torch.equal(l1, l2)


def test_npy_over_http_equals_local_also_when_blocks_are_evicted(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n_train=170, n_test=5, shard_size=50, image_format="npy")
    with static_files(root) as url:
        assert_same(batches(url), batches(str(root)))
        # 4-sample blocks, 16 kept (24 arena slots) of 44: slots are freed and reused
        small = dict(block=4, window=64)
        assert_same(batches(url, **small), batches(str(root), **small))
        assert_same(batches(url, num_workers=2, **small), batches(str(root), **small))
        assert_same(batches(url, wrap=True, steps=30, **small), batches(str(root), wrap=True, steps=30, **small))


def test_npy_over_http_truncated_or_bad_member_names_shard_and_offset(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n_train=60, n_test=3, shard_size=30, image_format="npy")
    index = pq.read_table(root / "index.parquet").to_pandas()
    shard = root / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    bad = int(index[(index.split == "train") & (index.shard == shard.name)].image_offset.iloc[3])
    data[bad + 2] ^= 0xFF  # a foreign npy header in one member
    shard.write_bytes(bytes(data))
    with static_files(root) as url:
        with pytest.raises(CorruptShardError, match=rf"train-000001\.tar at byte offset {bad} "):
            list(SampleStream(StreamConfig(source=url, batch_size=60)))
        first = root / "train-000000.tar"
        first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
        with pytest.raises(CorruptShardError, match=r"train-000000\.tar is truncated: sample .* at byte offset \d+"):
            list(SampleStream(StreamConfig(source=url, batch_size=60)))


class _RemoteDir(LocalSource):
    """Local files read as a remote source would (copies, block store), without a server."""

    local = False

    def fetch(self, requests):
        return [bytes(view) for view in super().fetch(requests)]


def test_a_full_arena_hands_the_oldest_unpinned_slot_to_a_new_block(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n_train=40, n_test=2, shard_size=20, image_format="npy")
    catalog = Catalog.load(LocalSource(root), "train")
    store = BlockStore(catalog, _RemoteDir(root), block=4, keep=2)  # 3 arena slots
    local = SampleReader(catalog, LocalSource(root))
    for rows in (np.array([0, 4, 8]), np.array([12, 13]), np.array([24, 21, 5])):
        store.ensure(rows)  # the first fills all 3 slots; each later block takes the oldest
        got = store.npy_images(rows)
        assert got is not None, "a block fell to the per-sample path"
        assert np.array_equal(got.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2), local.images(rows))
    slots = [held.slot for held in store._blocks.values()]
    assert len(slots) == len(set(slots)) and min(slots) >= 0


def test_local_blocks_are_preads_into_the_arena_not_reads_of_a_map(tmp_path):
    """The ideal world reads local shards as the remote ones: a block per os.pread into its
    arena slot (mapped shards read up to read_ahead_kb around every fault)."""
    root = write_synthetic_dataset(tmp_path / "ds", n_train=40, n_test=2, shard_size=20, image_format="npy")
    source = LocalSource(root)
    catalog = Catalog.load(source, "train")
    blocks = SampleReader(catalog, source, block=8)
    mapped = SampleReader(catalog, LocalSource(root))  # no block: the mapped gather
    assert blocks.blocks is not None and mapped.blocks is None
    rows = np.array([3, 17, 25, 39, 0, 21])
    assert np.array_equal(blocks.images(rows), mapped.images(rows))
    assert blocks.blocks.fetched == 4 and not [f for f in source._maps if f.endswith(".tar")]
