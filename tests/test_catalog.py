"""cifar5m.shards.catalog: one catalog for Dataset/Split and the training stream; key lookups by
binary search (no dict of every key); the index read batch by batch into position order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cifar5m.core.errors import ManifestError, SampleNotFoundError
from cifar5m.shards import catalog as catalog_module
from cifar5m.shards.catalog import Catalog
from cifar5m.shards.index import fixed_width
from cifar5m.shards.manifest import load_manifest
from cifar5m.shards.reader import Dataset
from cifar5m.shards.source import open_source
from cifar5m.shards.synthetic import synthetic_images
from cifar5m.shards.writer import DatasetWriter, Sample


def no_big_dict(*objects: object, size: int) -> bool:
    """Whether none of ``objects`` holds a dict (or list) with ``size`` entries or more."""
    return not any(isinstance(v, (dict, list)) and len(v) >= size
                   for obj in objects for v in vars(obj).values())


def test_split_and_stream_read_one_catalog(make_dataset):
    root = make_dataset(n_train=150, n_test=30, shard_size=40, image_format="npy")
    split = Dataset(root).split("train")
    stream = Catalog.load(open_source(str(root)), "train")
    for name in ("shard_id", "image_offset", "image_size", "labels", "keys", "digests", "group_digests",
                 "shard_start", "shard_count"):
        np.testing.assert_array_equal(getattr(split.catalog, name), getattr(stream, name), err_msg=name)
    assert split.catalog.shards == stream.shards and split.catalog.fingerprint() == stream.fingerprint()
    assert split.keys[:2] == ["t000000", "t000001"] and split.shard_of[45] == "train-000001.tar"


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_every_key_is_found_exactly_without_a_dict(tmp_path, monkeypatch, order):
    monkeypatch.setattr(catalog_module, "BATCH_ROWS", 16)  # several batches, several widths
    n = 90
    numbers = np.arange(n) if order == "sorted" else np.random.default_rng(0).permutation(n)
    keys = [f"k{i}" if i % 3 else f"key-{i:05d}" for i in numbers.tolist()]  # 2 to 9 bytes
    if order == "sorted":
        keys.sort()
    images = synthetic_images(n)
    with DatasetWriter(tmp_path / "ds", fingerprint={}, shard_size=25, image_format="npy") as w:
        for i, key in enumerate(keys):
            w.add("train", Sample(key, images[i], i % 10))
    split = Dataset(tmp_path / "ds").split("train")
    assert list(split.keys) == keys
    for i, key in enumerate(keys):
        assert split.position(key) == i
        np.testing.assert_array_equal(split.get(key).image, images[i])
    for missing in ("k", "k1000", "key-000011", "", "zzzzzzzzzzzzzzzzzz", "k1\0"):
        assert split.catalog.position(missing) is None
        with pytest.raises(SampleNotFoundError, match="no sample with key"):
            split.get(missing)
    assert (split.catalog._key_order is None) == (order == "sorted")
    assert no_big_dict(split, split.catalog, size=n)


def test_fixed_width_keeps_every_string():
    strings = ["", "a", "abc", "ab", "p0_0000001"]
    got = fixed_width(pa.array(strings).slice(1))
    assert got.dtype == np.dtype("S10") and [k.decode() for k in got.tolist()] == strings[1:]
    same = fixed_width(pa.array(["ab", "cd"]))
    assert same.dtype == np.dtype("S2") and same.tolist() == [b"ab", b"cd"]


def test_rows_land_at_their_positions_and_bad_positions_are_refused(make_dataset):
    root = make_dataset(n_train=40, n_test=10, shard_size=20)
    table = pq.read_table(root / "index.parquet")
    reference = Catalog.from_table(table, load_manifest(root), "train", url=str(root))
    reversed_rows = table.take(pa.array(np.arange(len(table))[::-1]))  # any row order: no sort needed
    got = Catalog.from_table(reversed_rows, load_manifest(root), "train", url=str(root))
    np.testing.assert_array_equal(got.keys, reference.keys)
    np.testing.assert_array_equal(got.image_offset, reference.image_offset)
    position = table["position"].to_pylist()
    position[3] = position[4]  # two rows claim one position
    twice = table.set_column(table.schema.get_field_index("position"), "position", pa.array(position))
    with pytest.raises(ManifestError, match=r"index\.parquet: the positions of split 'train' are not 0\.\.39"):
        Catalog.from_table(twice, load_manifest(root), "train", url=str(root))


def test_group_digests_are_kept_once_per_group(make_dataset):
    root = make_dataset(n_train=250, n_test=10, shard_size=100, image_format="npy")  # 100, 100, 50 rows
    cat = Catalog.load(open_source(str(root)), "train")
    table = pq.read_table(root / "index.parquet").filter(pa.compute.equal(pa.compute.field("split"), "train"))
    per_row = np.array(table.sort_by("position")["group_xxh3"].to_pylist(), np.uint64)
    rows = np.arange(len(cat))
    assert len(cat.group_digests) == 2 + 2 + 1
    np.testing.assert_array_equal(cat.group_digests[cat.group_of(rows)], per_row)
    np.testing.assert_array_equal(cat.group_first(np.array([0, 63, 64, 99, 100, 163, 164, 249])),
                                  [0, 0, 64, 64, 100, 100, 164, 200])
