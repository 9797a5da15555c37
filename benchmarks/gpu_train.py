"""The trainer's GPU checks (issue 7), used by ``gpu_check.py``.

* ``bench``: ``train_bench`` with ResNet-18 bf16 channels_last at batch 128 and 512:
  ideal world fed from shards vs compute-only (goal: >= 90 %; anchor: ~46k img/s at
  batch 512 on an H200).
* ``science``: on CIFAR-10 (a ``cifar5m import`` of it), ResNet-18, real world N=5,000
  reused vs ideal world with the 50,000 training images each used once, T=390 steps of
  128; plot and gap table packed into ``science.tar``.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench(*, smoke: bool = False, num_workers: int = 8, compile_: bool = False) -> list[dict]:
    from benchmarks import train_bench

    if smoke:
        argv = ["--device", "cpu", "--steps", "2", "--batch-sizes", "8", "--arch", "mlp"]
    else:
        argv = ["--device", "cuda", "--steps", "100", "--warmup", "20", "--block", "20",
                "--num-workers", str(num_workers)]
    return train_bench.main([*argv, *(["--compile"] if compile_ else [])])


def science(data: Path, work: Path, dest: Path, *, smoke: bool = False) -> str:
    from train.bootstrap import BootstrapConfig, run_bootstrap
    from train.trainer import TrainConfig

    if smoke:
        template = TrainConfig(data=str(data), world="real", n=64, arch="preresnet18", width=8, steps=6,
                               batch_size=16, log_every=2, log_dense=(), test_limit=64, device="cpu")
    else:
        # The paper code's defaults (plain SGD, lr 0.1, cosine). Momentum 0.9 at lr 0.1 diverged
        # (batch loss 8.9 at step 20, on the H200 and on CPU): the net has no final BN-ReLU.
        template = TrainConfig(data=str(data), world="real", n=5000, arch="preresnet18", steps=390,
                               log_every=16, log_dense=((128, 4),))
    result = run_bootstrap(BootstrapConfig(template), out=work / "science", progress=False)
    gap = (result.out / "gap.md").read_text()
    with tarfile.open(dest, "w") as tar:
        tar.add(result.out, arcname="science", filter=lambda m: None if m.name.endswith(".pt") else m)
    return gap
