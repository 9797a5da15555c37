"""Shard format vs webdataset's ShardWriter / WebDataset, same 20,000 CIFAR-10 images, one run.

    python benchmarks/shards_bench.py [--n 20000] [--cifar10 cifar10-jpeg.tar.gz]

Prints bytes per sample, write rate and single-process sequential read+decode rate,
each with the ratio ours/webdataset. The images are the JPEG re-encoded CIFAR-10 copy
(decoded to pixels first), so PNG sizes differ a little from the original CIFAR-10.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from cifar5m.shards.importer import iter_items, resolve_config
from cifar5m.shards.reader import Dataset
from cifar5m.shards.writer import DatasetWriter, Sample

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 10_000


def load_images(source: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    items = list(itertools.islice(iter_items(resolve_config([source])), n))
    return np.stack([i.load() for i in items]), np.array([i.label for i in items])


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def write_ours(root: Path, images, labels, fmt: str) -> None:
    with DatasetWriter(root, fingerprint={}, image_format=fmt, shard_size=SHARD_SIZE) as w:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            w.add("train", Sample(f"{i:08d}", image, int(label)))


def write_wds(root: Path, images, labels, fmt: str) -> None:
    root.mkdir(parents=True)
    with wds.ShardWriter(str(root / "train-%06d.tar"), maxcount=SHARD_SIZE, verbose=0) as sink:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            sink.write({"__key__": f"{i:08d}", fmt: image, "cls": int(label)})


def read_ours(root: Path) -> int:
    return sum(len(b.keys) for b in Dataset(root).split("train").iter_batches(256))


def read_wds(root: Path, fmt: str) -> int:
    urls = sorted(str(p) for p in root.glob("train-*.tar"))
    pipe = wds.WebDataset(urls, shardshuffle=False)
    pipe = pipe.decode("rgb8") if fmt == "png" else pipe.decode()
    count = 0
    for image, _label in pipe.to_tuple(fmt, "cls"):
        assert image.shape == (32, 32, 3)
        count += 1
    return count


def bytes_per_sample(root: Path, n: int) -> float:
    return sum(p.stat().st_size for p in root.glob("train-*.tar")) / n


def run(n: int, source: str) -> list[tuple]:
    images, labels = load_images(source, n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("png", "npy"):
            ours, theirs = Path(tmp) / f"ours-{fmt}", Path(tmp) / f"wds-{fmt}"
            t_ours, _ = timed(write_ours, ours, images, labels, fmt)
            t_wds, _ = timed(write_wds, theirs, images, labels, fmt)
            read_ours(ours), read_wds(theirs, fmt)  # warm the page cache for both
            r_ours, count = timed(read_ours, ours)
            r_wds, count_wds = timed(read_wds, theirs, fmt)
            assert count == count_wds == n
            b_ours, b_wds = bytes_per_sample(ours, n), bytes_per_sample(theirs, n)
            rows += [
                (f"{fmt}: bytes/sample", b_ours, b_wds, b_ours / b_wds, "<= 0.75" if fmt == "png" else ""),
                (f"{fmt}: write img/s", n / t_ours, n / t_wds, t_wds / t_ours, ""),
                (f"{fmt}: read+decode img/s", n / r_ours, n / r_wds, r_wds / r_ours,
                 ">= 2x" if fmt == "png" else ">= 20x wds png"),
            ]
        png_wds_rate = next(r[2] for r in rows if r[0] == "png: read+decode img/s")
        npy_ours_rate = next(r[1] for r in rows if r[0] == "npy: read+decode img/s")
        rows.append(("npy ours vs wds png read", npy_ours_rate, png_wds_rate, npy_ours_rate / png_wds_rate, ">= 20x"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--cifar10", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    args = parser.parse_args()
    rows = run(args.n, args.cifar10)
    print(f"\n{args.n:,} CIFAR-10 train images (JPEG re-encoded copy), one process, shard size {SHARD_SIZE:,}")
    print(f"{'metric':<28} {'cifar5m':>12} {'webdataset':>12} {'ratio':>8}  goal")
    for name, ours, theirs, ratio, goal in rows:
        print(f"{name:<28} {ours:>12,.0f} {theirs:>12,.0f} {ratio:>8.2f}  {goal}")


if __name__ == "__main__":
    main()
