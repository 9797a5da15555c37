"""The trainer's GPU checks, used by ``gpu_check.py``.

* ``bench``: ``train_bench`` with ResNet-18 bf16 channels_last at batch 128 and 512:
  ideal world fed from shards vs compute-only (goal: >= 90 %; anchor: ~46k img/s at
  batch 512 on an H200).
* ``science``: the Deep Bootstrap figure on a generated world: ``cifar5m generate`` with
  the builtin UNet and labeler (1,000,000 train + 10,000 test images, npy shards), then
  ``cifar5m bootstrap``'s sweep with ResNet-18 for N in {10,000, 50,000} and the ideal
  world over T = 7,800 steps of 128 (crop+flip); figure, gap table and curves packed
  into ``science.tar``. (The earlier CIFAR-10 T=390 check is documented in docs/training.md.)
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORLD_TRAIN, WORLD_TEST = 1_000_000, 10_000  # the generated world of the science part


def bench(*, smoke: bool = False, num_workers: int = 8, compile_: bool = False) -> list[dict]:
    from benchmarks import train_bench

    if smoke:
        argv = ["--device", "cpu", "--steps", "2", "--batch-sizes", "8", "--arch", "mlp"]
    else:
        argv = ["--device", "cuda", "--steps", "100", "--warmup", "20", "--block", "20",
                "--num-workers", str(num_workers)]
    return train_bench.main([*argv, *(["--compile"] if compile_ else [])])


def generate_world(work: Path, *, smoke: bool = False) -> Path:
    """``cifar5m generate`` with the builtin UNet and labeler: 1,000,000 train + 10,000 test
    images as npy shards (smoke: 192 + 48 on CPU). Resumes/reuses a finished dataset."""
    import subprocess

    out = work / "world"
    if smoke:
        args = ["--count", "240", "--test-count", "48", "--sampler", "ddim", "--steps", "1",
                "--shard-size", "96", "--batch-size", "240", "--device", "cpu"]
    else:
        args = ["--count", str(WORLD_TRAIN + WORLD_TEST), "--test-count", str(WORLD_TEST),
                "--sampler", "dpmsolver++", "--steps", "10", "--shard-size", "10000",
                "--batch-size", "2048"]
    subprocess.run([sys.executable, "-m", "cifar5m", "generate", "--model", "builtin", "--labeler",
                    "builtin", "--image-format", "npy", *args, "--out", str(out)],
                   check=True, cwd=ROOT)
    return out


def science(cifar10: Path | None, work: Path, dest: Path, *, left=lambda: float("inf"),
            smoke: bool = False) -> str:
    """The Deep Bootstrap figure on a generated world big enough for the ideal world.

    PreAct ResNet-18, real world N in {10,000, 50,000}, ideal world T = 7,800 steps of 128
    (100 epochs of the smallest N; 998,400 fresh samples), crop+flip, seed 0, and seed 1
    when the time ``left()`` allows (seed 0's runs are then reused). Also evaluated on
    CIFAR-10 test when ``cifar10`` (an imported dataset dir) is given. Figure, gap table,
    curves and configs are packed into ``dest``.
    """
    import time

    from cifar5m.train.bootstrap import run_bootstrap
    from cifar5m.train.config import BootstrapConfig, TrainConfig

    t0 = time.perf_counter()
    world = generate_world(work, smoke=smoke)
    log_generated(world, time.perf_counter() - t0)
    extra = {"cifar10_test": str(cifar10)} if cifar10 else {}
    if smoke:
        template = TrainConfig(data=str(world), arch="preresnet18", width=8, steps=12, batch_size=16,
                               augment="crop-flip", log_every=4, log_dense=(), test_limit=48,
                               device="cpu", **extra)
        ns = (32, 96)
    else:  # the paper code's optimiser (plain SGD, lr 0.1, cosine); log points kept few:
        # every one evaluates 10K test + 10K of the N (+ CIFAR-10 test) samples
        template = TrainConfig(data=str(world), arch="preresnet18", steps=7800, batch_size=128,
                               augment="crop-flip", log_every=200, log_dense=((1000, 50),),
                               train_eval_limit=10_000, num_workers=8, checkpoint_every=2000, **extra)
        ns = (10_000, 50_000)
    out = work / "science"
    t1 = time.perf_counter()
    result = run_bootstrap(BootstrapConfig(template, ns=ns, seeds=(0,)), out=out, progress=False)
    one_seed = time.perf_counter() - t1
    if left() > 1.15 * one_seed + 20:
        result = run_bootstrap(BootstrapConfig(template, ns=ns, seeds=(0, 1)), out=out, progress=False)
    gap = (result.out / "gap.md").read_text()
    with tarfile.open(dest, "w") as tar:
        tar.add(result.out, arcname="science",
                filter=lambda m: None if m.name.endswith((".pt", ".txt")) else m)
    return gap


def log_generated(world: Path, seconds: float) -> None:
    from gpu_models import log

    from cifar5m.shards.reader import Dataset

    ds = Dataset(world)
    log("science generate", {"train": len(ds.split("train")), "test": len(ds.split("test")),
                             "seconds": round(seconds, 1)})
