"""GPU check for issue 3: end-to-end generation vs DDPMPipeline fp16 on an H100/H200.

    python benchmarks/gpu_generate.py [--count 20480 --batch 512 --steps 20] [--out DIR]

Same UNet (ddpm-cifar10-32 architecture, random weights), same steps and batch for
both. Prints images/s, image-steps/s and the fraction of the card's dense bf16 peak
(989.5 TFLOP/s on H100 SXM and H200), plus our sampler alone (no labeling/writing)
to show what the CPU side costs. The goal (issue 3): end to end >= 2.5x DDPMPipeline
fp16, i.e. >= 25,000 image-steps/s.

The GPU image has torch but not diffusers/webdataset: install them from wheels first,
e.g. ``pip install --no-deps diffusers-*.whl huggingface_hub-*.whl safetensors-*.whl``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate_bench import PEAK_TFLOPS, bench_ours, bench_pipeline, save_models, sync, table


def card_name() -> str:
    name = torch.cuda.get_device_name(0)
    return "H200" if "H200" in name else "H100" if "H100" in name else name


def bench_sampler_only(unet_dir: Path, *, batch: int, steps: int, sampler: str, device: str = "cuda",
                       repeats: int = 5) -> float:
    from generator import model as model_mod
    from generator.sampler import Sampler

    src = model_mod.resolve(str(unet_dir))
    s = Sampler(model_mod.load_unet(src), src.scheduler_config, sampler=sampler, steps=steps,
                device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                compile=device == "cuda")
    ids = torch.arange(batch)
    s.sample(0, ids)  # compile
    sync(device)
    t0 = time.perf_counter()
    for r in range(repeats):
        s.sample(0, ids + batch * (r + 1))
    sync(device)
    return batch * repeats / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    import shutil
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=10240, help="N: runs of N and 2N images are timed")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this is the GPU check (run generate_bench.py on CPU)")
    card = card_name() if gpu else "cpu"
    root = Path(tempfile.mkdtemp(prefix="gpu-generate-"))
    try:
        unet_dir, labeler = save_models(root)
        base = bench_pipeline(unet_dir, batch=args.batch, steps=args.steps, device=args.device,
                              dtype=torch.float16 if gpu else torch.float32, repeats=5 if gpu else 1)
        alone = bench_sampler_only(unet_dir, batch=args.batch, steps=args.steps, sampler=args.sampler,
                                   device=args.device, repeats=5 if gpu else 1)
        steady, cold = bench_ours(unet_dir, labeler, root, count=args.count, batch=args.batch,
                                  steps=args.steps, sampler=args.sampler, device=args.device,
                                  dtype="bf16" if gpu else "fp32", compile_=gpu)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"card={torch.cuda.get_device_name(0) if gpu else 'cpu'} batch={args.batch} steps={args.steps} sampler={args.sampler} "
          f"count={args.count}+{2 * args.count}; torch {torch.__version__}")
    print(table([(f"DDPMPipeline {'fp16' if gpu else 'fp32'} (sampling only)", base),
                 ("our sampler bf16+channels_last+compile (sampling only)", alone),
                 ("cifar5m generate, end to end, steady (label+PNG+tar+index)", steady),
                 ("  same, including start-up (load, hash; compile cached)", cold)],
                steps=args.steps, peak=PEAK_TFLOPS.get(card)))
    print(f"6M images at {args.steps} steps, end to end: {6e6 / steady / 3600:.2f} GPU-hours on "
          f"this card (goal: < 1.5 at 20 steps; >= 25,000 image-steps/s)")


if __name__ == "__main__":
    main()
