"""CPU sampling speed of ``--exact-cpu`` vs ``--fast-cpu`` (oneDNN), fp32 and bf16, one process.

The builtin UNet (generator/builtin/unet, 0.43 GFLOP per image per call) sampled by our
``Sampler`` (DPM-Solver++), at one batch size, after a warm-up call; the figure is
image-steps/s (one UNet call on one image). The constants behind ``generate``'s time
estimates (generator/defaults.py, GFLOP/s per thread) and the ``--fast-cpu`` help text
come from this script.

    python benchmarks/cpu_kernels_bench.py                  # batch 256, 2 steps
    python benchmarks/cpu_kernels_bench.py --with-exact-bf16  # + exact bf16 (very slow)
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch


def rate(*, dtype: torch.dtype, exact: bool, batch: int, steps: int) -> float:
    from diffusers.utils import logging as dlogging

    from cifar5m.generator import model as model_mod
    from cifar5m.generator.generation import cpu_determinism
    from cifar5m.generator.sampler import Sampler

    dlogging.set_verbosity_error()
    src = model_mod.resolve("builtin")
    sampler = Sampler(model_mod.load_unet(src), src.scheduler_config, sampler="dpmsolver++",
                      steps=steps, dtype=dtype)
    ids = torch.arange(batch, dtype=torch.int64)
    with cpu_determinism(torch.device("cpu")) if exact else contextlib.nullcontext():
        sampler.sample(0, ids[: min(batch, 16)])  # warm-up: oneDNN primitives, allocator
        start = time.perf_counter()
        sampler.sample(0, ids)
        elapsed = time.perf_counter() - start
    return batch * steps / elapsed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--with-exact-bf16", action="store_true")
    args = p.parse_args(argv)
    gflop = 0.43
    threads = torch.get_num_threads()
    rows = [("exact", "fp32", torch.float32), ("fast", "fp32", torch.float32),
            ("fast", "bf16", torch.bfloat16)]
    if args.with_exact_bf16:
        rows.insert(1, ("exact", "bf16", torch.bfloat16))
    print(f"builtin UNet, DPM-Solver++, batch {args.batch}, {args.steps} steps, {threads} threads, "
          f"oneDNN bf16 native: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print("| kernels | dtype | image-steps/s | vs exact fp32 | GFLOP/s per thread |")
    print("|---|---|---:|---:|---:|")
    base = None
    for kernels, name, dtype in rows:
        r = rate(dtype=dtype, exact=kernels == "exact", batch=args.batch, steps=args.steps)
        base = r if base is None else base
        print(f"| {kernels} | {name} | {r:,.1f} | {r / base:.1f}x | {r * gflop / threads:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
