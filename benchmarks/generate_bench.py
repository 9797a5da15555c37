"""End-to-end generation throughput vs diffusers' DDPMPipeline, same UNet, steps and batch.

UNet: the google/ddpm-cifar10-32 architecture with random weights (speed does not
depend on the weights; nothing is downloaded). Labeler: airbench-shaped, random.

    python benchmarks/generate_bench.py                 # CPU: tiny counts
    python benchmarks/gpu_generate.py                   # GPU: the H200 check (docs/generate.md)

Ours = ``cifar5m.generator.pipeline.run`` (sample, label, PNG-encode, tar, index, manifest),
in steady state: after a one-batch warm-up run (compiles, fills caches), two fresh runs
of N and 2N images, their difference timed (start-up cancels); the figure including
start-up (with warm caches) is printed too.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

GFLOP = 12.44  # per image per UNet call (docs/generate.md)
PEAK_TFLOPS = {"cpu": None, "H100": 989.5, "H200": 989.5}  # dense bf16


def ddpm_cifar10_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        time_embedding_type="positional", freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
        mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-6,
        attention_head_dim=None)


def save_models(root: Path) -> tuple[Path, Path]:
    from diffusers import DDPMScheduler

    from cifar5m.generator.labeler import AirbenchNet, save_labeler
    from cifar5m.shards.format import CIFAR10_CLASSES

    torch.manual_seed(0)
    ddpm_cifar10_unet().save_pretrained(root / "unet")
    DDPMScheduler(variance_type="fixed_large", clip_sample=True).save_pretrained(root / "unet")
    lab = save_labeler(AirbenchNet(), root / "labeler", arch="airbench", arch_kwargs={},
                       class_names=list(CIFAR10_CLASSES))
    return root / "unet", lab


def bench_pipeline(unet_dir: Path, *, batch: int, steps: int, device: str, dtype: torch.dtype,
                   repeats: int) -> float:
    """DDPMPipeline images/s (its own loop, DDPMScheduler, output_type numpy)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(unet_dir, torch_dtype=dtype).to(device)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_pretrained(unet_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=batch, num_inference_steps=steps, output_type="np")  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        pipe(batch_size=batch, num_inference_steps=steps, output_type="np")
    sync(device)
    return batch * repeats / (time.perf_counter() - t0)


def bench_ours(unet_dir: Path, labeler: Path, out: Path, *, count: int, batch: int, steps: int,
               sampler: str, device: str, dtype: str, compile_: bool) -> tuple[float, float]:
    """Our images/s: (steady state, including start-up).

    Two fresh runs, of ``count`` and ``2 * count`` images: their time difference is
    ``count`` images with model loading, hashing and compilation cancelled out.
    """
    from cifar5m.generator.config import GenerateConfig
    from cifar5m.generator.pipeline import run

    def timed(n: int, where: Path) -> float:
        cfg = GenerateConfig(count=n, out=str(where), model=str(unet_dir), labeler=str(labeler),
                             sampler=sampler, steps=steps, batch_size=batch,
                             shard_size=max(batch, count // 2), test_count=0, device=device,
                             dtype=dtype, compile=compile_, workers=2, exact_cpu=True)
        sync(device)
        t0 = time.perf_counter()
        run(cfg, progress=False)
        sync(device)
        return time.perf_counter() - t0

    # A warm-up run first: on the H200 (2026-11-28) the first run paid ~60 s of torch.compile
    # that the second got from the cache, so the difference of two cold runs came out ~0.
    timed(batch, out / "warmup")
    t1 = timed(count, out / "one")
    t2 = timed(2 * count, out / "two")
    if t2 - t1 < 0.2 * t1:  # the extra images must cost a visible share of the run
        print(f"steady state not measurable: {count} images took {t1:.1f} s, {2 * count} took {t2:.1f} s; "
              "raise --count")
        return float("nan"), 2 * count / t2
    return count / (t2 - t1), 2 * count / t2


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def table(rows: list[tuple[str, float]], *, steps: int, peak: float | None) -> str:
    base = rows[0][1]
    lines = [f"{'':68s} {'images/s':>10s} {'image-steps/s':>14s} {'% of peak':>10s} {'vs baseline':>12s}"]
    for name, ips in rows:
        frac = f"{ips * steps * GFLOP * 1e9 / (peak * 1e12):.1%}" if peak else "-"
        lines.append(f"{name:68s} {ips:10.2f} {ips * steps:14.1f} {frac:>10s} {ips / base:11.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--card", default="cpu", help="name of the card (for the fraction of peak)")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if not gpu:
        torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="generate-bench-"))
    try:
        unet_dir, labeler = save_models(root)
        pipe_dtype = torch.float16 if gpu else torch.float32
        base = bench_pipeline(unet_dir, batch=args.batch, steps=args.steps, device=args.device,
                              dtype=pipe_dtype, repeats=args.repeats)
        steady, cold = bench_ours(unet_dir, labeler, root, count=args.count, batch=args.batch,
                                  steps=args.steps, sampler=args.sampler, device=args.device,
                                  dtype="bf16" if gpu else "fp32", compile_=gpu)
        name = "bf16+channels_last+compile" if gpu else "fp32, deterministic CPU convs"
        print(f"device={args.device} ({args.card}) batch={args.batch} steps={args.steps} "
              f"sampler={args.sampler} count={args.count}+{2 * args.count}; torch {torch.__version__}")
        print(table([(f"DDPMPipeline {'fp16' if gpu else 'fp32'} (sampling only)", base),
                     (f"cifar5m generate {name} (end to end, steady)", steady),
                     ("  same, including start-up (load, hash; compile cached)", cold)],
                    steps=args.steps, peak=PEAK_TFLOPS.get(args.card)))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
