"""Labeling throughput of a ViT-B/16 at 224 px (random weights, bf16) vs the sampler's rate.

    python benchmarks/gpu_labelers.py [--batches 128 256 512] [--smoke]

Does labeling 6M images with a CIFAR-10 ViT-B/16 (the kind of model the Hub has, see
docs/labelers.md) cost minutes or hours, and at what batch size? The ViT is saved with
``save_pretrained`` and loaded through ``cifar5m.generator.hub_labeler`` (the real path:
32x32 uint8 -> resize to 224 on the device -> ViT in bf16 autocast -> softmax in CIFAR-10
order). The sampler's images/s (ddpm-cifar10-32 architecture, DDIM 20 steps) is
measured in the same run, so the table says which of the two bounds ``generate``.

``--smoke`` runs on the CPU at batch 4 (fp32): it checks the script, and its numbers are a
CPU stand-in only. The GPU image needs transformers too (pip install transformers).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cifar5m.shards.format import CIFAR10_CLASSES

SAMPLES = 6_000_000


def save_vit_b16(path: Path) -> Path:
    """ViT-B/16 (86M params) with a 10-class CIFAR head and its processor, random weights."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    names = list(CIFAR10_CLASSES)
    cfg = ViTConfig(image_size=224, patch_size=16, num_labels=10, id2label=dict(enumerate(names)),
                    label2id={n: i for i, n in enumerate(names)})
    ViTForImageClassification(cfg).save_pretrained(path)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(path)
    return path


def labeler_rate(lab, *, batch: int, repeats: int) -> float:
    """Images/s of ``lab.predict`` on uint8 CPU batches (the copy to the GPU included)."""
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    lab.batch_size = batch
    lab.predict(images)  # warm-up: kernels, allocator
    t0 = time.perf_counter()
    for _ in range(repeats):
        lab.predict(images)  # numpy out: synchronised
    return batch * repeats / (time.perf_counter() - t0)


def sampler_rate(root: Path, *, batch: int, steps: int, device: str) -> float:
    from generate_bench import save_models
    from gpu_generate import bench_sampler_only

    unet_dir, _ = save_models(root)
    return bench_sampler_only(unet_dir, batch=batch, steps=steps, sampler="ddim", device=device,
                              repeats=3 if device == "cuda" else 1)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="sampler steps (DDIM)")
    p.add_argument("--sampler-batch", type=int, default=512)
    p.add_argument("--smoke", action="store_true", help="CPU, batch 4: checks the script runs")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --smoke on CPU")
    batches, repeats = ([4], 1) if args.smoke else (args.batches, args.repeats)
    from cifar5m.generator.labeler import load_labeler

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-labelers-") as tmp:
        lab = load_labeler(str(save_vit_b16(Path(tmp) / "vit-b16")), device=device)
        dtype = lab.details()["dtype"]
        for batch in batches:
            try:
                rate = labeler_rate(lab, batch=batch, repeats=repeats)
            except torch.OutOfMemoryError:
                rows.append({"what": f"ViT-B/16 224px {dtype}, batch {batch}", "img_s": None})
                torch.cuda.empty_cache()
                continue
            rows.append({"what": f"ViT-B/16 224px {dtype}, batch {batch}", "img_s": rate})
        del lab
        sb, steps = (4, 2) if args.smoke else (args.sampler_batch, args.steps)
        rows.append({"what": f"sampler ddpm-cifar10-32 DDIM {steps} steps, batch {sb}",
                     "img_s": sampler_rate(Path(tmp), batch=sb, steps=steps, device=device)})
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (stand-in, not a GPU figure)"
    print(f"card={card} torch={torch.__version__}")
    print(f"| {'what':<48} | {'img/s':>10} | {'6M images':>10} |")
    print(f"|{'-' * 50}|{'-' * 12}|{'-' * 12}|")
    for r in rows:
        rate = r["img_s"]
        cost = "OOM" if rate is None else f"{SAMPLES / rate / 3600:.2f} h"
        shown = "-" if rate is None else f"{rate:,.0f}" if rate >= 100 else f"{rate:.2f}"
        print(f"| {r['what']:<48} | {shown:>10} | {cost:>10} |")
    return rows


if __name__ == "__main__":
    main()
