"""Settings chosen by the device when the user leaves them out, and what a run will take.

``GenerateConfig`` fields left at ``None`` / ``"auto"`` are filled in by ``for_device``:

* CUDA: the CIFAR-5m setting, DDPM with 1000 steps (FID 3.17 for google/ddpm-cifar10-32),
  bf16 and ``torch.compile``.
* CPU: DPM-Solver++ (multistep, order 3) at ``CPU_STEPS`` steps with oneDNN kernels
  (``--fast-cpu``), in bf16 where the CPU computes it natively (AMX or AVX512-BF16; oneDNN
  says so), else fp32. DDPM's 1000 exact fp32 steps would take about an hour for 200 images
  of the builtin UNet on 2 cores.

The resolved values, not the ``None``\\s, are what the fingerprint, ``generate_config.json``
and the manifest record (the manifest also lists which ones the device chose), and every
one has its own option, so any choice can be overridden.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Any

from cifar5m.generator.config import DEFAULT_STEPS, GenerateConfig

PAPER_TEST_COUNT = 10_000
CPU_SAMPLER, CPU_STEPS = "dpmsolver++", 20
CUDA_SAMPLER = "ddpm"
# Sampler throughput in GFLOP/s (UNet FLOPs x image-steps / s), used only to estimate times.
# CPU: per thread, builtin UNet, batch 256, Xeon with AMX (the 2-core development machine,
# benchmarks/cpu_kernels_bench.py). CUDA: our sampler on one H200 (bf16, compiled,
# batch 512): 25,612 image-steps/s x 12.44 GFLOP (README, benchmarks/gpu_generate.py).
CPU_GFLOPS_PER_THREAD = {("fast", "bf16"): 119.0, ("fast", "fp32"): 43.0, ("exact", "fp32"): 19.6,
                         ("exact", "bf16"): 0.7}
CUDA_GFLOPS = 318_600.0
OVERRIDES = {"sampler": "--sampler", "steps": "--steps", "dtype": "--dtype", "kernels": "--exact-cpu",
             "compile": "--no-compile"}


def default_test_count(count: int) -> int:
    """The paper's 10,000 test samples from count 60,000 up, else a sixth (CIFAR-10's 10k of 60k)."""
    return min(PAPER_TEST_COUNT, count // 6)


def with_test_count(cfg: GenerateConfig, previous: dict[str, Any] | None) -> GenerateConfig:
    """``cfg`` with its test split fixed: as given, else that of the dataset already in the
    output (``previous`` is its fingerprint, so extending keeps the split), else the default."""
    if cfg.test_count is not None:
        return cfg
    old = (previous or {}).get("test_count")
    keep = isinstance(old, int) and 0 <= old < cfg.count
    return replace(cfg, test_count=old if keep else default_test_count(cfg.count))


def device_type(device: str) -> str:
    """'cuda' or 'cpu' for ``--device`` (auto asks torch whether it sees a GPU)."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 or AMX); emulated bf16 is slow."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_threads(current: int, *, cores: int | None = None, load: float | None = None) -> int:
    """Threads for CPU sampling: ``current`` (torch's, one per core unless set), but no more
    than the cores not already busy (1-minute load average), at least 1. On 2 shared cores
    at load 7, 2 oneDNN threads ran 36 image-steps/s against 102 for 1: each barrier waits
    for a thread the OS has descheduled. A thread count the user set (OMP_NUM_THREADS) stays."""
    if "OMP_NUM_THREADS" in os.environ:
        return current
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # not on every platform
            return current
    return max(1, min(current, math.floor(cores - load + 0.5)))


def for_device(cfg: GenerateConfig, device: str, *, bf16: bool | None = None) -> GenerateConfig:
    """``cfg`` with every setting left to the device filled in for ``device`` ('cpu'/'cuda').

    ``bf16``: whether the CPU has native bf16 (None: ask oneDNN). Idempotent.
    """
    cuda = device == "cuda"
    sampler = cfg.sampler or (CUDA_SAMPLER if cuda else CPU_SAMPLER)
    steps = cfg.steps
    if steps is None:
        steps = CPU_STEPS if not cuda and cfg.sampler is None else DEFAULT_STEPS[sampler]
    exact = cfg.exact_cpu if cfg.exact_cpu is not None else cuda  # kernels matter only on CPU
    dtype = cfg.dtype
    if dtype == "auto":
        native = bf16 if bf16 is not None else (not cuda and not exact and cpu_has_bf16())
        dtype = "bf16" if cuda or (not exact and native) else "fp32"
    compile_ = cfg.compile if cfg.compile is not None else cuda
    return replace(cfg, sampler=sampler, steps=steps, exact_cpu=exact, dtype=dtype, compile=compile_)


def chosen(given: GenerateConfig, device: str) -> list[str]:
    """The settings ``for_device`` chose (the user left them out) among those that matter."""
    out = [name for name, value in (("sampler", given.sampler), ("steps", given.steps))
           if value is None]
    if given.dtype == "auto":
        out.append("dtype")
    if device == "cpu" and given.exact_cpu is None:
        out.append("kernels")
    if device == "cuda" and given.compile is None:
        out.append("compile")
    return out


def sampling_threads(device: str) -> int | None:
    """Torch threads for sampling on ``device``: on a CPU, torch's count capped by the idle
    cores (``cpu_threads``); None elsewhere (torch's own count stays; the GPU does the work)."""
    if device != "cpu":
        return None
    import torch

    return cpu_threads(torch.get_num_threads())


def image_steps_per_s(cfg: GenerateConfig, device: str, gflop: float, *, threads: int | None = None,
                      gpus: int = 1) -> float:
    """Estimated sampler throughput of a resolved ``cfg`` for a UNet of ``gflop`` per call."""
    if device == "cuda":
        return CUDA_GFLOPS * gpus / gflop
    kernels = "exact" if cfg.exact_cpu else "fast"
    per_thread = CPU_GFLOPS_PER_THREAD[(kernels, "bf16" if cfg.dtype == "bf16" else "fp32")]
    return per_thread * max(threads or 1, 1) / gflop


def estimate_seconds(cfg: GenerateConfig, device: str, *, images: int, nfe: int, gflop: float,
                     threads: int | None = None, gpus: int = 1) -> float:
    """Estimated sampling time of ``images`` at ``nfe`` UNet calls of ``gflop`` each (the start
    line of a run and ``--dry-run`` both print this)."""
    return images * nfe / image_steps_per_s(cfg, device, gflop, threads=threads, gpus=gpus)


def format_seconds(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h"


def describe_device(cfg: GenerateConfig, device: str, *, threads: int | None = None,
                    gpus: int = 1) -> str:
    """E.g. 'cpu (2 threads): dpmsolver++ 20 steps, bf16, oneDNN kernels'."""
    where = f"cuda x {gpus}" if device == "cuda" and gpus > 1 else device
    if device == "cpu":
        threads = threads or 1
        where += f" ({threads} thread{'s' if threads != 1 else ''})"
    how = [f"{cfg.sampler} {cfg.num_steps} steps", cfg.dtype]
    if device == "cpu":
        how.append("exact native kernels" if cfg.exact_cpu else "oneDNN kernels")
    else:
        how.append("compiled" if cfg.compile else "eager")
    return f"{where}: {', '.join(how)}"


def start_line(cfg: GenerateConfig, device: str, auto: list[str], *, images: int, nfe: int,
               gflop: float, threads: int | None = None, gpus: int = 1) -> str:
    """One line: what runs where, which settings the device chose, and the estimated time."""
    seconds = estimate_seconds(cfg, device, images=images, nfe=nfe, gflop=gflop, threads=threads,
                               gpus=gpus)
    line = f"generate on {describe_device(cfg, device, threads=threads, gpus=gpus)}"
    if auto:
        line += (f" ({', '.join(auto)} chosen for {device}; override with "
                 f"{' '.join(OVERRIDES[a] for a in auto)})")
    return (line + f"; {images:,} images x {nfe} steps, about {format_seconds(seconds)} "
            f"(estimate; the bar's ETA is measured)")
