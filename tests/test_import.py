"""``cifar5m import`` of CIFAR-5m npz parts and CIFAR-10 (JPEG tree, python batches)."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from cifar5m.core.errors import InvalidSourceError
from cifar5m.shards.importer import import_dataset, iter_items, resolve_config
from cifar5m.shards.reader import Dataset
from cifar5m.shards.synthetic import synthetic_images
from cifar5m.shards.verify import verify_dataset


def write_part(path, n, *, seed, x=None, y=None, compressed=False):
    x = synthetic_images(n, seed=seed) if x is None else x
    y = (np.arange(n) * 7 + seed) % 10 if y is None else y
    (np.savez_compressed if compressed else np.savez)(path, X=x, Y=y)
    return x, y


def test_npz_parts_paper_split(tmp_path):
    parts = [write_part(tmp_path / f"cifar5m_part{p}.npz", 30, seed=p, compressed=p == 1) for p in range(3)]
    sources = [str(tmp_path / f"cifar5m_part{p}.npz") for p in range(3)]
    config = resolve_config(sources, test_part=2, test_count=12, shard_size=25)
    assert config.format == "cifar5m-npz"
    import_dataset(tmp_path / "out", config, progress=False)
    ds = Dataset(tmp_path / "out")
    train, test = ds.split("train"), ds.split("test")
    assert len(train) == 60 and len(test) == 12  # the rest of part 2 is dropped, as in the paper
    assert train.keys[0] == "p0_0000000" and train.keys[30] == "p1_0000000" and test.keys[11] == "p2_0000011"
    np.testing.assert_array_equal(train.get("p1_0000007").image, parts[1][0][7])
    assert train.get("p1_0000007").label == parts[1][1][7]
    np.testing.assert_array_equal(test[5].image, parts[2][0][5])
    verify_dataset(tmp_path / "out", decode=True, progress=False)


def test_npz_rest_of_test_part_to_train_and_fsspec_url(tmp_path):
    x, _ = write_part(tmp_path / "p.npz", 20, seed=4)
    with fsspec.open("memory://bucket/cifar5m_part5.npz", "wb") as f:
        f.write((tmp_path / "p.npz").read_bytes())
    config = resolve_config(["memory://bucket/cifar5m_part5.npz"], test_count=5, rest_of_test_part="train")
    import_dataset(tmp_path / "out", config, progress=False)
    ds = Dataset(tmp_path / "out")
    assert len(ds.split("test")) == 5 and len(ds.split("train")) == 15
    np.testing.assert_array_equal(ds.split("train")[0].image, x[5])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((2, 32, 32, 3), np.uint8), "Y": np.zeros(2, int)}, r"expected arrays 'X'.*'images'"),
        ({"X": np.zeros((2, 32, 32), np.uint8), "Y": np.zeros(2, int)}, r"shape \(2, 32, 32\).*expected \(N, 32, 32, 3\) uint8"),
        ({"X": np.zeros((2, 32, 32, 3), np.float32), "Y": np.zeros(2, int)}, r"dtype float32"),
        ({"X": np.zeros((2, 32, 32, 3), np.uint8), "Y": np.zeros(3, int)}, r"2 images but Y 3 labels"),
        ({"X": np.zeros((2, 32, 32, 3), np.uint8), "Y": np.array([0, 12])}, r"labels must be in 0..9"),
    ],
)
def test_bad_npz_is_refused_naming_the_file(tmp_path, arrays, message):
    path = tmp_path / "cifar5m_part0.npz"
    np.savez(path, **arrays)
    with pytest.raises(InvalidSourceError, match=message) as info:
        import_dataset(tmp_path / "out", resolve_config([str(path)]), progress=False)
    assert str(path) in str(info.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_not_a_zip(tmp_path):
    path = tmp_path / "cifar5m_part0.npz"
    path.write_bytes(b"hello")
    with pytest.raises(InvalidSourceError, match="is not an npz"):
        import_dataset(tmp_path / "out", resolve_config([str(path)]), progress=False)


def test_cifar10_jpeg_slice_from_shared_data(tmp_path, cifar10_jpeg):
    config = resolve_config([str(cifar10_jpeg)], limit=40, shard_size=32)
    assert config.format == "cifar10-jpeg"
    import_dataset(tmp_path / "c10", config, progress=False)
    ds = Dataset(tmp_path / "c10")
    train = ds.split("train")
    assert len(train) == 40 and len(ds.split("test")) == 40
    assert train.keys[:3] == ["train_airplane_0000", "train_automobile_0000", "train_bird_0000"]
    assert train.labels.tolist() == [i % 10 for i in range(40)]
    with tarfile.open(cifar10_jpeg) as tar:
        jpeg = tar.extractfile("train/bird/0001.jpg").read()
    expected = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    np.testing.assert_array_equal(train.get("train_bird_0001").image, expected)
    verify_dataset(tmp_path / "c10", decode=True, progress=False)


def test_jpeg_tree_with_wrong_size_image(tmp_path):
    (tmp_path / "tree" / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "tree" / "train" / "cat" / "0000.jpg")
    with pytest.raises(InvalidSourceError, match=r"train/cat/0000.jpg: image is 64x64, not 32x32 RGB"):
        import_dataset(tmp_path / "out", resolve_config([str(tmp_path / "tree")]), progress=False)


def write_python_batches(root, n=4):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    images = synthetic_images(6 * n, seed=9)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        chunk = images[b * n : (b + 1) * n]
        doc = {b"data": chunk.transpose(0, 3, 1, 2).reshape(n, -1), b"labels": [(b + j) % 10 for j in range(n)]}
        (base / name).write_bytes(pickle.dumps(doc))
    return base, images


def test_cifar10_python_batches(tmp_path):
    base, images = write_python_batches(tmp_path)
    config = resolve_config([str(base)])
    assert config.format == "cifar10-python"
    import_dataset(tmp_path / "out", config, progress=False)
    ds = Dataset(tmp_path / "out")
    train, test = ds.split("train"), ds.split("test")
    assert len(train) == 20 and len(test) == 4
    np.testing.assert_array_equal(train[6].image, images[6])
    assert train[6].label == (1 + 2) % 10
    np.testing.assert_array_equal(test[1].image, images[21])


def test_interrupted_import_finishes_identically(tmp_path, monkeypatch):
    write_part(tmp_path / "cifar5m_part0.npz", 50, seed=2)
    sources = [str(tmp_path / "cifar5m_part0.npz")]
    config = resolve_config(sources, shard_size=8)
    import_dataset(tmp_path / "ref", config, progress=False)

    import cifar5m.shards.importer as importer

    real = importer.iter_items

    def crashing(cfg, **callbacks):
        for i, item in enumerate(real(cfg, **callbacks)):
            if i == 29:
                raise OSError("network dropped")
            yield item

    monkeypatch.setattr(importer, "iter_items", crashing)
    with pytest.raises(OSError, match="network dropped"):
        import_dataset(tmp_path / "out", config, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    monkeypatch.setattr(importer, "iter_items", real)
    import_dataset(tmp_path / "out", config, progress=False)
    for name in ["train-000000.tar", "train-000006.tar", "index.parquet", "manifest.json"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_workers_give_the_same_dataset(tmp_path):
    write_part(tmp_path / "cifar5m_part0.npz", 40, seed=3)
    sources = [str(tmp_path / "cifar5m_part0.npz")]
    import_dataset(tmp_path / "a", resolve_config(sources, shard_size=8), progress=False)
    import_dataset(tmp_path / "b", resolve_config(sources, shard_size=8, workers=2), progress=False)
    for name in ["train-000004.tar", "index.parquet"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_unknown_source_format(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(InvalidSourceError, match="cannot tell the format.*--format"):
        resolve_config([str(tmp_path / "x.bin")])


def test_iter_items_order_is_stable(tmp_path):
    write_part(tmp_path / "cifar5m_part0.npz", 5, seed=1)
    config = resolve_config([str(tmp_path / "cifar5m_part0.npz")])
    assert [i.key for i in iter_items(config)] == [f"p0_{i:07d}" for i in range(5)]


KILLED_PARENT = """
import os, sys, time
from cifar5m.shards.writer import DatasetWriter
w = DatasetWriter(sys.argv[1], fingerprint={"source": "kill-test"}, workers=2)
list(w._pool.map(time.sleep, [0.5, 0.5]))  # both workers are up
print("ready", flush=True)
time.sleep(60)
"""


def descendants(pid: int) -> set[int]:
    """PIDs below ``pid`` (read from /proc), recursively."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_import_workers_die_with_a_killed_parent(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PARENT, str(tmp_path / "ds")],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert proc.stdout.readline().strip() == "ready"
        below = descendants(proc.pid)
        assert len(below) >= 4  # fork server, 2 workers, resource tracker
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in below):
        time.sleep(0.1)
    assert not [p for p in below if alive(p)], "workers outlived their killed parent"


def test_progress_counts_every_source_row_and_ends_at_its_total(tmp_path, capsys):
    for p in (0, 5):
        write_part(tmp_path / f"cifar5m_part{p}.npz", 30, seed=p, compressed=p == 5)
    sources = [str(tmp_path / f"cifar5m_part{p}.npz") for p in (0, 5)]
    # Part 5 gives 5 test rows and drops its other 25: they count, so the bar ends at 60/60.
    manifest = import_dataset(tmp_path / "ds", resolve_config(sources, test_count=5, shard_size=8))
    totals = manifest.totals()
    assert totals["train"]["samples"] == 30 and totals["test"]["samples"] == 5
    last = [line for line in capsys.readouterr().err.replace("\n", "\r").split("\r") if line.strip()][-1]
    assert last.startswith("import ds: 100%") and "60/60" in last, last
    assert "cifar5m_part5.npz" in last, last  # the source being read
    # With --limit the rows past it are read too (and counted): the bar still ends at 60/60.
    import_dataset(tmp_path / "lim", resolve_config(sources, test_count=5, limit=4))
    last = [line for line in capsys.readouterr().err.replace("\n", "\r").split("\r") if line.strip()][-1]
    assert last.startswith("import lim: 100%") and "60/60" in last, last


def test_planned_samples_apply_the_limit_per_split_as_the_import_does(tmp_path):
    from cifar5m.shards.importer import planned_samples

    for p in (0, 1, 5):
        write_part(tmp_path / f"cifar5m_part{p}.npz", 30, seed=p)
    sources = [str(tmp_path / f"cifar5m_part{p}.npz") for p in (0, 1, 5)]
    # train: parts 0 and 1 (60 rows); test: part 5's first 5, its other 25 dropped
    assert planned_samples(resolve_config(sources, test_count=5)) == 65
    assert planned_samples(resolve_config(sources, test_count=5, rest_of_test_part="train")) == 90
    config = resolve_config(sources, test_count=5, limit=20, shard_size=16)
    assert planned_samples(config) == 25  # --limit is per split (20 train + 5 test), not per part
    manifest = import_dataset(tmp_path / "ds", config, progress=False)
    assert sum(t["samples"] for t in manifest.totals().values()) == 25
