"""Ideal-world training fed from shards vs the compute-only bound, ResNet-18.

Both columns run the trainer's own SGD step (``cifar5m.train.trainer.Learner.step``: device
augmentation, bf16 autocast, channels_last) on the same model; they differ only in
where the batch comes from:

* compute-only: one batch already on the device, stepped on again and again;
* from shards: ``cifar5m.train.batches.TrainData`` in the ideal world, i.e. ``SampleStream``
  reading and decoding fresh samples from shards (``--num-workers`` processes), copied
  to the device one batch ahead.

The goal is >= 90 % of compute-only. Without ``--data`` a synthetic npy
dataset with enough fresh samples is written to a temp dir first.

    python benchmarks/train_bench.py                      # CPU: a few steps
    python benchmarks/train_bench.py --device cuda --steps 200 --block 20 --num-workers 8 --compile
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cifar5m.shards.writer import DatasetWriter, Sample
from cifar5m.train.batches import TrainData
from cifar5m.train.config import TrainConfig
from cifar5m.train.distributed import Runtime
from cifar5m.train.trainer import Learner


def synthetic_dataset(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    with DatasetWriter(root, fingerprint={"bench": n}, image_format="npy", shard_size=10_000,
                       provenance={"source": "train_bench synthetic"}) as w:
        for i in range(n):
            w.add("train", Sample(f"b{i:08d}", rng.integers(0, 256, (32, 32, 3), np.uint8), i % 10))
        for i in range(100):
            w.add("test", Sample(f"v{i:06d}", rng.integers(0, 256, (32, 32, 3), np.uint8), i % 10))
    return root


def measure(config: TrainConfig, rt: Runtime, *, warmup: int, steps: int, block: int) -> tuple[float, float]:
    """Images/s (compute-only, from shards): medians over alternating timed blocks of steps.

    Alternating blocks of ``block`` steps between the two sources on the same model makes
    the ratio robust to a shared machine whose speed drifts (the 2 CPU cores this was
    written on are shared by 6 people); each block ends with a device sync.
    """
    learner = Learner.build(config, rt)
    data = TrainData.open(config, rt)
    x = torch.randint(0, 256, (config.batch_size, 3, 32, 32), dtype=torch.uint8, device=rt.device)
    y = torch.randint(0, 10, (config.batch_size,), device=rt.device)
    sources = {"compute": lambda: (x, y), "shards": lambda: data.next_batch(copy_next=True)}
    for _ in range(warmup):
        for get in sources.values():
            learner.step(*get())
    rates: dict[str, list[float]] = {name: [] for name in sources}
    for _ in range(max(1, steps // block)):
        for name, get in sources.items():
            rt.sync()
            start = time.perf_counter()
            for _ in range(block):
                loss = learner.step(*get())
            float(loss)  # waits for the device
            rates[name].append(block * config.batch_size / (time.perf_counter() - start))
    return float(np.median(rates["compute"])), float(np.median(rates["shards"]))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="dataset dir with >= (warmup+steps)*batch train samples")
    p.add_argument("--batch-sizes", default="128,512")
    p.add_argument("--steps", type=int, default=4, help="timed steps per source")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per source")
    p.add_argument("--block", type=int, default=1, help="steps per timed block (GPU: 20)")
    p.add_argument("--arch", default="preresnet18")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rt = Runtime.start(device=args.device)
    need = (args.warmup + args.steps + 1) * max(sizes)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(synthetic_dataset(Path(tmp) / "bench", need + 1))
        results = []
        for bs in sizes:
            config = TrainConfig(data=data, world="ideal", arch=args.arch, batch_size=bs,
                                 steps=args.warmup + args.steps + 1, precision=args.precision,
                                 device=args.device, num_workers=args.num_workers,
                                 compile=args.compile, augment="crop-flip")
            compute, shards = measure(config, rt, warmup=args.warmup, steps=args.steps, block=args.block)
            results.append({"batch": bs, "compute_only": compute, "from_shards": shards})
    where = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.arch}, {args.precision}, channels_last, crop+flip on device, {where}, "
          f"median of {max(1, args.steps // args.block)} alternating blocks of {args.block} steps "
          f"after {args.warmup} warm-up, num_workers={args.num_workers}")
    print("| batch | compute-only img/s | ideal world from shards img/s | ratio |")
    print("|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['batch']} | {r['compute_only']:,.0f} | {r['from_shards']:,.0f} | "
              f"{r['from_shards'] / r['compute_only']:.2f} |")
    rt.stop()
    return results


if __name__ == "__main__":
    main()
