"""GPU check: end-to-end generation vs DDPMPipeline fp16 on an H100/H200.

    python benchmarks/gpu_generate.py [--count 20480 --batch 512 --steps 20] [--out DIR]

Same UNet (ddpm-cifar10-32 architecture, random weights), same steps and batch for
both. Prints images/s, image-steps/s and the fraction of the card's dense bf16 peak
(989.5 TFLOP/s on H100 SXM and H200), plus our sampler alone (no labeling/writing)
to show what the CPU side costs. The goal: end to end >= 2.5x DDPMPipeline fp16.

End to end is the steady state: a warm-up run first (fills the compile cache), then
fresh runs of N and 2N images; N images / (t(2N) - t(N)) cancels start-up. Then each
stage (sample, label, select, encode, write) is timed alone, to show where the end-to-end
time goes and whether the writer threads keep up with sampling.

The GPU image has torch but not diffusers/webdataset: install them from wheels first,
e.g. ``pip install --no-deps diffusers-*.whl huggingface_hub-*.whl safetensors-*.whl``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
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
    from cifar5m.generator import model as model_mod
    from cifar5m.generator.sampler import Sampler

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


def stage_times(unet_dir: Path, labeler_dir: Path, *, batch: int, steps: int, sampler: str,
                device: str = "cuda", repeats: int = 3) -> dict[str, float]:
    """Seconds per image of each stage of ``cifar5m generate``, each timed alone after a warm-up.

    Main thread (serial with sampling): sample (incl. the device-to-host copy of the uint8
    images), label (host-to-device again, airbench forward with flip TTA), select (Python
    per sample). Writer threads (``--workers``, overlapped): encode (PNG + tar + sha256 +
    index rows) and write (temp file + fsync + rename). ``copy`` is the device-to-host copy
    alone, to show its share of ``sample``.
    """
    from cifar5m.core.atomic import atomic_write_bytes
    from cifar5m.generator import model as model_mod
    from cifar5m.generator.labeler import load_labeler
    from cifar5m.generator.producer import Producer
    from cifar5m.generator.sampler import Sampler
    from cifar5m.shards.shard import build_shard

    gpu = device.startswith("cuda")
    src = model_mod.resolve(str(unet_dir))
    s = Sampler(model_mod.load_unet(src), src.scheduler_config, sampler=sampler, steps=steps,
                device=device, dtype=torch.bfloat16 if gpu else torch.float32, compile=gpu)
    lab = load_labeler(str(labeler_dir), device=device)
    prod = Producer(s, lab, seed=0, batch_size=batch, num_classes=10, conditional=False)
    ids = torch.arange(batch)
    images = s.sample(0, ids)  # warm-up (compile)
    probs = lab.predict(images).cpu()
    on_device = images.to(device)

    def timed(fn) -> float:
        fn()  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / (repeats * batch)

    kept: list = []

    def select() -> None:
        kept.clear()
        prod._select(ids, images, probs, kept, None, batch)

    out: dict[str, float] = {
        "sample": timed(lambda: s.sample(0, ids)),
        "copy": timed(lambda: on_device.cpu()),
        "label": timed(lambda: lab.predict(images).cpu()),
        "select": timed(select),
    }
    select()
    shard: list = []

    def encode() -> None:
        shard[:] = [build_shard("train", 0, kept, image_format="png", where="bench")]

    out["encode"] = timed(encode)
    with tempfile.TemporaryDirectory() as tmp:
        out["write"] = timed(lambda: atomic_write_bytes(Path(tmp) / "shard.tar", shard[0][0]))
    return out


def stage_table(times: dict[str, float], *, workers: int = 2) -> str:
    main_thread = times["sample"] + times["label"] + times["select"]
    writers = (times["encode"] + times["write"]) / workers
    lines = [f"{'stage (per 1,000 images)':34s} {'ms':>10s} {'where':>28s}"]
    for name, where in (("sample", "main (GPU, incl. copy)"), ("copy", "  (device-to-host alone)"),
                        ("label", "main (GPU)"), ("select", "main (Python)"),
                        ("encode", f"{workers} writer threads"), ("write", f"{workers} writer threads")):
        lines.append(f"{name:34s} {times[name] * 1e6:10.1f} {where:>28s}")
    bound = "sampling" if main_thread >= writers else "the writer threads"
    lines.append(f"main thread {main_thread * 1e6:.1f} ms vs writers {writers * 1e6:.1f} ms per 1,000 images "
                 f"(encode+write / {workers}): bound by {bound}; sampling is "
                 f"{times['sample'] / max(main_thread, writers):.0%} of the critical path")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import shutil

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
        stages = stage_times(unet_dir, labeler, batch=args.batch, steps=args.steps, sampler=args.sampler,
                             device=args.device, repeats=3 if gpu else 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"card={torch.cuda.get_device_name(0) if gpu else 'cpu'} batch={args.batch} steps={args.steps} sampler={args.sampler} "
          f"count={args.count}+{2 * args.count}; torch {torch.__version__}")
    print(table([(f"DDPMPipeline {'fp16' if gpu else 'fp32'} (sampling only)", base),
                 ("our sampler bf16+channels_last+compile (sampling only)", alone),
                 ("cifar5m generate, end to end, steady (label+PNG+tar+index)", steady),
                 ("  same, including start-up (load, hash; compile cached)", cold)],
                steps=args.steps, peak=PEAK_TFLOPS.get(card)))
    print(stage_table(stages))
    print(f"6M images at {args.steps} steps, end to end: {6e6 / steady / 3600:.2f} GPU-hours on "
          f"this card (goal: < 1.5 at 20 steps; >= 25,000 image-steps/s)")


if __name__ == "__main__":
    main()
