"""The shard format: round trips, determinism, interop with webdataset and datasets, bad input."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from cifar5m.core.errors import (
    ChecksumMismatchError,
    ConfigMismatchError,
    CorruptShardError,
    DatasetExistsError,
    DatasetNotFoundError,
    InvalidImageError,
    ManifestVersionError,
    SampleNotFoundError,
    ShardNotFoundError,
)
from cifar5m.shards.index import balanced_subset, read_index
from cifar5m.shards.reader import Dataset
from cifar5m.shards.synthetic import synthetic_images
from cifar5m.shards.verify import verify_dataset
from cifar5m.shards.writer import DatasetWriter, Sample


@pytest.mark.parametrize("image_format", ["png", "npy"])
def test_round_trip_pixels_labels_and_random_access(make_dataset, image_format):
    root = make_dataset(n_train=150, n_test=30, shard_size=40, image_format=image_format)
    images = synthetic_images(180)
    ds = Dataset(root)
    train = ds.split("train")
    assert len(train) == 150 and train.keys[:2] == ["t000000", "t000001"]
    got = np.concatenate([b.images for b in train.iter_batches(32)])
    labels = np.concatenate([b.labels for b in train.iter_batches(32)])
    np.testing.assert_array_equal(got, images[:150])
    np.testing.assert_array_equal(labels, np.arange(150) % 10)
    assert [s.key for s in train][:3] == ["t000000", "t000001", "t000002"]
    np.testing.assert_array_equal(train.get("t000123").image, images[123])
    np.testing.assert_array_equal(train[-1].image, images[149])
    test = ds.split("test")
    np.testing.assert_array_equal(test[7].image, images[157])
    assert test[7].label == 7
    assert [s.samples for s in ds.manifest.split_shards("train")] == [40, 40, 40, 30]
    with pytest.raises(SampleNotFoundError, match="no sample with key 'nope'"):
        train.get("nope")


def test_split_load_holds_the_first_samples(make_dataset, monkeypatch):
    root = make_dataset(n_train=150, n_test=30, shard_size=40)
    images = synthetic_images(180)
    train = Dataset(root).split("train")
    keys, got, labels = train.load()
    assert keys == train.keys and labels.dtype == np.int64
    np.testing.assert_array_equal(got, images[:150])
    np.testing.assert_array_equal(labels, np.arange(150) % 10)
    read = []
    decode = train.decode_shard
    monkeypatch.setattr(train, "decode_shard", lambda shard: read.append(shard) or decode(shard))
    keys, got, labels = train.load(limit=45)
    assert keys == train.keys[:45] and read == ["train-000000.tar", "train-000001.tar"]  # no more
    np.testing.assert_array_equal(got, images[:45])
    assert len(train.load(limit=1000).keys) == 150


def test_index_columns_and_offsets_point_at_members(make_dataset):
    root = make_dataset(n_train=20, n_test=5, shard_size=8)
    index = read_index(root / "index.parquet")
    row = index.slice(9, 1).to_pylist()[0]
    assert row["key"] == "t000009" and row["shard"] == "train-000001.tar" and row["position"] == 9
    assert row["confidence"] == pytest.approx(0.9) and row["seed"] == 9 and row["probs"] is None
    with tarfile.open(root / row["shard"]) as tar:
        member = tar.getmember("t000009.png")
        assert member.offset_data == row["image_offset"] and member.size == row["image_size"]
        assert tar.extractfile("t000009.cls").read() == b"9"
        # plain USTAR headers, fixed metadata: no pax headers
        assert all(m.pax_headers == {} and m.mtime == 0 and m.uid == 0 for m in tar.getmembers())


def test_same_input_gives_byte_identical_datasets(make_dataset):
    a = make_dataset("a", n_train=90, shard_size=32)
    b = make_dataset("b", n_train=90, shard_size=32)
    for name in ["train-000000.tar", "train-000002.tar", "test-000000.tar", "index.parquet", "manifest.json", "README.md"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_webdataset_reads_our_shards(make_dataset):
    webdataset = pytest.importorskip("webdataset")
    root = make_dataset(n_train=50, shard_size=20)
    images = synthetic_images(100)
    urls = [str(root / f"train-00000{i}.tar") for i in range(3)]
    pipeline = webdataset.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "png", "cls")
    got = list(pipeline)
    assert [k for k, _, _ in got] == [f"t{i:06d}" for i in range(50)]
    for i, (_, image, label) in enumerate(got):
        np.testing.assert_array_equal(image, images[i])
        assert label == i % 10


def test_datasets_webdataset_builder_reads_our_shards(make_dataset):
    datasets = pytest.importorskip("datasets")
    root = make_dataset(n_train=30, shard_size=16)
    images = synthetic_images(80)
    ds = datasets.load_dataset("webdataset", data_files={"train": str(root / "train-*.tar")},
                               split="train", streaming=True)
    rows = list(ds)
    assert [r["__key__"] for r in rows] == [f"t{i:06d}" for i in range(30)]
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(np.asarray(row["png"].convert("RGB")), images[i])
        assert row["cls"] == i % 10


def test_verify_passes_and_decodes(make_dataset):
    report = verify_dataset(make_dataset(n_train=40, shard_size=16), decode=True, progress=False)
    assert report.shards == 7 and report.samples == {"train": 40, "test": 50} and report.decoded == 90


def test_truncated_shard_is_named(make_dataset):
    root = make_dataset(n_train=40, shard_size=16)
    shard = root / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ChecksumMismatchError, match="train-000001.tar has 5000 bytes"):
        verify_dataset(root, progress=False)
    with pytest.raises(CorruptShardError, match="train-000001.tar is truncated"):
        Dataset(root).split("train").decode_shard("train-000001.tar")


def test_flipped_byte_fails_checksum_and_decoding(make_dataset):
    root = make_dataset(n_train=20, shard_size=20)
    shard = root / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    offset = read_index(root / "index.parquet").slice(3, 1).to_pylist()[0]["image_offset"]
    data[offset + 40] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="does not match its sha256"):
        verify_dataset(root, progress=False)


def test_tar_structure_mismatch_is_corrupt(make_dataset):
    """A shard whose bytes match the manifest but not the index is reported with its offset."""
    root = make_dataset(n_train=10, shard_size=10)
    manifest = json.loads((root / "manifest.json").read_text())
    shard = root / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[0:8] = b"zzzzzzzz"  # clobber the first member's name: header checksum breaks
    shard.write_bytes(bytes(data))
    import hashlib

    for s in manifest["shards"]:
        if s["file"] == shard.name:
            s["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptShardError, match=r"train-000000.tar at byte 0: tar header checksum"):
        verify_dataset(root, progress=False)


def test_missing_shard(make_dataset):
    root = make_dataset(n_train=40, shard_size=16)
    (root / "train-000002.tar").unlink()
    with pytest.raises(ShardNotFoundError, match="train-000002.tar is missing"):
        verify_dataset(root, progress=False)
    with pytest.raises(FileNotFoundError):  # also a builtin
        Dataset(root).split("train").decode_shard("train-000002.tar")


def test_newer_manifest_version_is_refused(make_dataset):
    root = make_dataset(n_train=10)
    doc = json.loads((root / "manifest.json").read_text())
    doc["version"] = 99
    (root / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestVersionError, match="format version 99.*upgrade cifar5m"):
        Dataset(root)


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no manifest.json"):
        Dataset(tmp_path)


def test_image_that_is_not_32x32_rgb(tmp_path):
    with pytest.raises(InvalidImageError, match=r"sample 'k0'.*\(32, 32, 4\)"), \
            DatasetWriter(tmp_path / "d", fingerprint={}) as w:
        w.add("train", Sample("k0", np.zeros((32, 32, 4), np.uint8), 0))
        w.close()
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_bad_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="invalid sample key 'a.b'"), \
            DatasetWriter(tmp_path / "d", fingerprint={}, shard_size=1) as w:
        w.add("train", Sample("a.b", np.zeros((32, 32, 3), np.uint8), 0))


def test_crash_resumes_to_identical_dataset(tmp_path, make_dataset):
    images = synthetic_images(100)
    reference = make_dataset("ref", n_train=100, n_test=0, shard_size=16)

    def run(root, crash_at=None):
        with DatasetWriter(root, fingerprint={"test": 0}, image_format="png", shard_size=16,
                           provenance={"source": "synthetic test data"}) as w:
            for i in range(w.completed("train"), 100):
                if i == crash_at:
                    raise KeyboardInterrupt
                w.add("train", Sample(f"t{i:06d}", images[i], i % 10, confidence=0.9, seed=i))

    root = tmp_path / "crashy"
    with pytest.raises(KeyboardInterrupt):
        run(root, crash_at=70)
    assert not (root / "manifest.json").exists()
    assert sorted(p.name for p in root.glob("*.tar")) == [f"train-00000{i}.tar" for i in range(4)]
    assert not list(root.glob(".*.tmp"))
    run(root)
    for name in ["train-000004.tar", "train-000006.tar", "index.parquet", "manifest.json"]:
        assert (root / name).read_bytes() == (reference / name).read_bytes(), name
    assert not (root / "_work").exists()


def test_begin_drops_damaged_shards_only_when_asked(tmp_path):
    from cifar5m.shards.writer import begin

    images = synthetic_images(48)
    root = tmp_path / "crashy"
    with pytest.raises(KeyboardInterrupt), DatasetWriter(root, fingerprint={"t": 0}, shard_size=16) as w:
        for i in range(48):
            if i == 40:
                raise KeyboardInterrupt
            w.add("train", Sample(f"t{i:06d}", images[i], i % 10))
    fp = json.loads((root / "_work" / "state.json").read_text())["fingerprint"]
    torn = root / "train-000001.tar"
    torn.write_bytes(torn.read_bytes()[:-512])
    with pytest.raises(ChecksumMismatchError, match="train-000001.tar does not match the checksum"):
        begin(root, fp)
    dropped: list[tuple[str, str]] = []
    kept = begin(root, fp, on_damaged=lambda shard, why: dropped.append((shard.name, why)))
    assert sorted(kept) == ["train-000000.tar"]
    assert dropped == [("train-000001.tar", "does not match its recorded sha256")]
    assert not torn.exists() and len(list((root / "_work").glob("*.parquet"))) == 1


def test_finished_dataset_and_other_settings_are_refused(tmp_path, make_dataset):
    root = make_dataset(n_train=10)
    with pytest.raises(DatasetExistsError, match="already holds a finished dataset"):
        DatasetWriter(root, fingerprint={"test": 0}, shard_size=64)
    partial = tmp_path / "partial"
    with pytest.raises(RuntimeError), DatasetWriter(partial, fingerprint={"a": 1}, shard_size=1) as w:
        w.add("train", Sample("k", np.zeros((32, 32, 3), np.uint8), 0))
        raise RuntimeError
    with pytest.raises(ConfigMismatchError, match=r"other settings \(a differ"):
        DatasetWriter(partial, fingerprint={"a": 2}, shard_size=1)


def test_extend_appends_shards(make_dataset):
    root = make_dataset(n_train=32, n_test=0, shard_size=16)
    images = synthetic_images(64, seed=1)
    def extend(crash_at=None):
        with DatasetWriter(root, fingerprint={"test": 0}, shard_size=16, extend=True,
                           provenance={"source": "synthetic test data"}) as w:
            # while shards change, readers see an unfinished write, never stale offsets
            with pytest.raises(DatasetNotFoundError, match="unfinished write"):
                Dataset(root)
            for i in range(w.completed("train"), 64):
                if i == crash_at:
                    raise KeyboardInterrupt
                w.add("train", Sample(f"t{i:06d}", images[i], i % 10))

    with pytest.raises(KeyboardInterrupt):
        extend(crash_at=50)
    assert sorted(p.name for p in root.glob("train-*.tar"))[-1] == "train-000002.tar"
    extend()
    train = Dataset(root).split("train")
    assert len(train) == 64 and train.keys[40] == "t000040"
    np.testing.assert_array_equal(train[50].image, images[50])


def test_balanced_subset_is_balanced_and_deterministic():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    a = balanced_subset(labels, 30, seed=3, num_classes=3)
    assert len(a) == len(set(a.tolist())) == 30
    assert np.bincount(labels[a], minlength=3).tolist() == [10, 10, 10]
    np.testing.assert_array_equal(a, balanced_subset(labels, 30, seed=3, num_classes=3))
    labels = np.array([0] * 50 + [1] * 30 + [2] * 5)
    short = balanced_subset(labels, 45, seed=0, num_classes=3)
    assert np.bincount(labels[short], minlength=3).tolist() == [20, 20, 5]
    with pytest.raises(ValueError, match="asked for 100 samples but the split holds 85"):
        balanced_subset(labels, 100, seed=0, num_classes=3)


def test_card_is_hub_yaml(make_dataset):
    import yaml

    text = (make_dataset(n_train=10) / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "train-*.tar"},
                                               {"split": "test", "path": "test-*.tar"}]
    names = meta["dataset_info"]["features"][1]["dtype"]["class_label"]["names"]
    assert names["0"] == "airplane" and names["9"] == "truck" and meta["size_categories"] == ["n<1K"]


def test_datasets_reads_the_directory_as_a_hub_repo(make_dataset):
    """The card's `configs` and features drive `datasets` with no arguments but the path."""
    datasets = pytest.importorskip("datasets")
    root = make_dataset(n_train=12, n_test=5, shard_size=8)
    ds = datasets.load_dataset(str(root), split="test", streaming=True)
    assert ds.features["cls"].names[3] == "cat"
    rows = list(ds)
    assert [r["cls"] for r in rows] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(np.asarray(rows[4]["png"]), synthetic_images(17)[16])


def test_written_files_are_readable_by_others(make_dataset):
    import os
    import stat

    root = make_dataset(n_train=5, n_test=0)
    mask = os.umask(0)
    os.umask(mask)
    for name in ["train-000000.tar", "index.parquet", "manifest.json", "README.md"]:
        assert stat.S_IMODE((root / name).stat().st_mode) == 0o666 & ~mask, name
