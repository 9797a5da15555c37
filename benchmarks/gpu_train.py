"""The trainer's GPU check (pending: no GPU was available when it was written).

Runs on one CUDA GPU, in about 5 minutes:

1. ``train_bench``: ResNet-18 bf16 channels_last, batch 128 and 512, ideal world fed
   from shards vs compute-only (goal: >= 90 %; anchor: ~46k img/s at batch 512 on an
   H200), eager and with ``torch.compile``;
2. with ``--cifar10 DIR`` (a ``cifar5m import`` of CIFAR-10, e.g. carried to the GPU
   machine): the science check with ResNet-18, real world N=5,000 vs ideal world
   50,000 fresh, T=390 steps, written to ``$OUT/science`` (plot, gap table).

    python benchmarks/gpu_train.py [--cifar10 /path/to/cifar10-ds] [--out $OUT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    import torch

    from benchmarks import train_bench

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar10", help="CIFAR-10 dataset dir for the science check")
    p.add_argument("--out", default="gpu-train-out")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--num-workers", type=int, default=8)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_train needs a CUDA GPU")
    common = ["--device", "cuda", "--steps", str(args.steps), "--warmup", "20", "--block", "20",
              "--num-workers", str(args.num_workers)]
    train_bench.main(common)
    train_bench.main([*common, "--compile"])
    if args.cifar10:
        from train.bootstrap import BootstrapConfig, run_bootstrap
        from train.trainer import TrainConfig

        template = TrainConfig(data=args.cifar10, world="real", n=5000, arch="preresnet18",
                               steps=390, log_every=16, log_dense=((128, 4),))
        result = run_bootstrap(BootstrapConfig(template), out=Path(args.out) / "science")
        print((result.out / "gap.md").read_text())


if __name__ == "__main__":
    main()
