"""GPU retrain of the builtin labeler and generator: one prepared script, <= 15 GPU-minutes.

Run on a machine with one CUDA GPU (it needs `diffusers` and `safetensors`; the
project's GPU image lacks diffusers, so bring its wheel):

    python benchmarks/gpu_models.py --cifar10 ../shared/data/cifar10-jpeg.tar.gz \
        [--cifar10-original cifar-10-batches-py] [--generator-minutes 11] [--install]

Steps (each prints one line of JSON; all of it is also written to $OUT or ./gpu-models/):
1. `cifar5m import` the JPEG copy (and the original python batches if given) as npy.
2. Labeler: airbench94 widths (64,256,256), 10 epochs, batch 1024, bf16, whole split
   on the GPU. Goal: >= 91 % on the JPEG copy's test split in < 60 s of training, and
   >= 94 % on the original CIFAR-10 test set. A 5 MB-cap labeler (32,64,128) is
   trained too, as the builtin candidate.
3. Generator: the builtin architecture (<= 20 MB, cheap on CPU) trained for
   --generator-minutes of wall clock in bf16, then saved with save_pretrained.
4. With --install, the results replace generator/builtin/{labeler,unet}; the model
   cards still need their numbers updated by hand (the script prints them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Builtin generator architecture (the one the CPU run used; ~1.5M params, 0.43 GFLOP/img-step).
GEN_ARCH = dict(block_out_channels=(24, 48, 96), layers_per_block=1, attention_levels=(2,), norm_num_groups=8,
                dropout=0.0)


def log(out: Path, name: str, record: dict) -> None:
    line = json.dumps({"step": name, **record}, default=str)
    print(line, flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(line + "\n")


def import_dataset(src: str, dest: Path) -> Path:
    if not (dest / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "cifar5m", "import", src, "--out", str(dest),
                        "--image-format", "npy", "--workers", str(min(8, os.cpu_count() or 1))], check=True)
    return dest


def train_labelers(out: Path, data: Path, original: Path | None) -> dict:
    from generator.labeler_training import LabelerTrainConfig, train_labeler

    results = {}
    runs = [("airbench94-jpeg", data, (64, 256, 256)), ("builtin-jpeg", data, (32, 64, 128))]
    if original is not None:
        runs.append(("airbench94-original", original, (64, 256, 256)))
    for name, ds, widths in runs:
        cfg = LabelerTrainConfig(data=str(ds), out=str(out / f"labeler-{name}"), widths=widths, epochs=10,
                                 batch_size=1024, precision="bf16", checkpoint_every=10_000,
                                 work=str(out / f"labeler-{name}-work"))
        t0 = time.perf_counter()
        metrics = train_labeler(cfg, device="cuda", progress=False)
        metrics.pop("history", None)
        metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
        log(out, f"labeler {name}", metrics)
        results[name] = metrics
    return results


def train_small_generator(out: Path, data: Path, minutes: float) -> dict:
    """Train the builtin-size UNet for ``minutes`` of wall clock, then finalise it."""
    from generator.unet_training import UNetTrainConfig, train_generator

    def cfg(steps: int) -> UNetTrainConfig:
        return UNetTrainConfig(data=str(data), out=str(out / "unet"), **GEN_ARCH, lr=2e-4 * 4, batch_size=512,
                               warmup_steps=500, ema_decay=0.9995, ema_warmup=True, steps=steps,
                               checkpoint_every=2000, sample_every=0, precision="bf16",
                               work=str(out / "unet-work"))

    t0, step, chunk = time.perf_counter(), 0, 2000
    while time.perf_counter() - t0 < minutes * 60:
        step += chunk
        train_generator(cfg(10**9), stop_after=step, progress=False)
    metrics = train_generator(cfg(step), progress=False)
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
    log(out, "generator", metrics)
    return metrics


def install(out: Path, labeler_name: str) -> None:
    builtin = ROOT / "generator" / "builtin"
    for src, dest in ((out / f"labeler-{labeler_name}", builtin / "labeler"), (out / "unet", builtin / "unet")):
        card = (dest / "MODEL_CARD.md").read_text() if (dest / "MODEL_CARD.md").is_file() else None
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest)
        if card is not None:
            (dest / "MODEL_CARD.md").write_text(card + "\n\n**GPU retrain installed; update the numbers above "
                                                 "from gpu-models/results.jsonl.**\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar10", required=True, help="cifar10-jpeg.tar.gz (the shared JPEG copy)")
    p.add_argument("--cifar10-original", help="cifar-10-batches-py (original CIFAR-10), optional")
    p.add_argument("--generator-minutes", type=float, default=11.0)
    p.add_argument("--skip-generator", action="store_true")
    p.add_argument("--install", action="store_true", help="copy the results into generator/builtin/")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    out = Path(os.environ.get("OUT", "gpu-models"))
    out.mkdir(parents=True, exist_ok=True)
    log(out, "device", {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__})
    data = import_dataset(args.cifar10, out / "cifar10-jpeg")
    original = import_dataset(args.cifar10_original, out / "cifar10-original") if args.cifar10_original else None
    train_labelers(out, data, original)
    if not args.skip_generator:
        train_small_generator(out, data, args.generator_minutes)
    if args.install:
        install(out, "builtin-jpeg")


if __name__ == "__main__":
    main()
