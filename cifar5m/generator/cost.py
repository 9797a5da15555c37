"""What a run will cost: FLOPs per UNet call, the total, and the ``--dry-run`` report.

The time estimate itself (sampler throughput, threads, the start line of a run) is in
``cifar5m.generator.defaults``, so that ``--dry-run`` and a run's start line give the same number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cifar5m.generator.plan import FILTER_STRIDE, plan_shards

if TYPE_CHECKING:
    from cifar5m.generator.config import GenerateConfig
    from cifar5m.generator.model import ModelSource

# Per image per UNet call: torch.utils.flop_counter on the google/ddpm-cifar10-32 config
# (``measure_gflop``) plus the attention that FlopCounterMode does not see on CPU (0.34).
DDPM_CIFAR10_GFLOP = 12.44
DDPM_CIFAR10_SOURCE = "google/ddpm-cifar10-32 architecture, measured"
H100_BF16_PEAK_TFLOPS = 989.5  # dense, datasheet


def is_ddpm_cifar10(config: dict) -> bool:
    """Whether a UNet config is the google/ddpm-cifar10-32 architecture (FLOPs known)."""
    return (tuple(config.get("block_out_channels", ())) == (128, 256, 256, 256)
            and config.get("layers_per_block") == 2
            and tuple(config.get("down_block_types", ())) == (
                "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
            and not config.get("num_class_embeds"))


def measure_gflop(config: dict) -> float:
    """GFLOP per image per UNet call, counted with torch.utils.flop_counter on random weights.

    FlopCounterMode does not see CPU SDPA attention (+0.34 GFLOP, 2.7 %, on the DDPM UNet).
    """
    import torch
    from diffusers import UNet2DModel
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")}).eval()
    x = torch.zeros(1, 3, 32, 32)
    labels = torch.zeros(1, dtype=torch.long) if config.get("num_class_embeds") else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, 500, class_labels=labels)
    return counter.get_total_flops() / 1e9


def gflop_per_call(config: dict) -> tuple[float, str]:
    """GFLOP per image per UNet call of a UNet config, and where the number comes from."""
    if is_ddpm_cifar10(config):
        return DDPM_CIFAR10_GFLOP, DDPM_CIFAR10_SOURCE
    return measure_gflop(config), "counted with torch.utils.flop_counter, attention excluded"


def sampling_cost(cfg: GenerateConfig, source: ModelSource) -> tuple[int, float, str]:
    """UNet calls per image (NFE) of a resolved ``cfg`` with the model ``source``, the GFLOP of
    one call and where that number comes from: what the start line and ``--dry-run`` report."""
    from cifar5m.generator.sampler import build_scheduler  # imports torch

    nfe = len(build_scheduler(cfg.sampler, source.scheduler_config, cfg.num_steps).timesteps)
    return (nfe, *gflop_per_call(source.config))


def hours_at(total_flop: float, mfu: float) -> float:
    return total_flop / (mfu * H100_BF16_PEAK_TFLOPS * 1e12) / 3600


def describe(*, count: int, nfe: int, gflop: float, gflop_source: str, shards: int,
             test_count: int, stride: int) -> str:
    """The dry-run report."""
    total = gflop * 1e9 * nfe * count
    lines = [
        f"images:        {count:,} ({test_count:,} test, {count - test_count:,} train) in {shards} shards",
        f"NFE per image: {nfe} (one UNet call per step)",
        f"UNet cost:     {gflop:.2f} GFLOP per image per call ({gflop_source})",
        f"total:         {total:.3g} FLOP",
    ]
    if stride > 1:
        lines.append(f"filters on:    up to {stride}x more candidates per kept image; costs above "
                     f"are for 100 % acceptance")
    for mfu in (0.25, 0.40):
        hours = hours_at(total, mfu)
        lines.append(f"H100 at {mfu:.0%} of bf16 peak: {hours:,.2f} GPU-hours "
                     f"({count / (hours * 3600):,.0f} images/s)")
    # image-steps/s of DDPMPipeline fp16, batch 512, on an H200: our GPU check of 2026-11-28
    # (docs/generate.md, "GPU check"; benchmarks/gpu_generate.py)
    ddpm_pipe = 10_884
    if gflop_source == DDPM_CIFAR10_SOURCE:
        hours = count * nfe / ddpm_pipe / 3600
        lines.append(f"diffusers DDPMPipeline fp16 ({ddpm_pipe:,} image-steps/s, H200): {hours:,.2f} GPU-hours")
    return "\n".join(lines)


def dry_run(cfg: GenerateConfig) -> str:
    """The plan of ``cfg`` on the device it would run on, without loading weights: the default
    model needs no download. torch is imported only to find the device (--device auto), whether
    a CPU runs bf16 natively, and how many threads it would sample with."""
    from cifar5m.generator import defaults
    from cifar5m.generator.model import DEFAULT_MODEL, resolve

    device = defaults.device_type(cfg.device)
    given = defaults.with_test_count(cfg, None)
    auto = defaults.chosen(given, device)
    cfg = defaults.for_device(given, device)

    if cfg.model == DEFAULT_MODEL and not _in_cache(cfg.model):
        nfe, gflop, source = cfg.num_steps, DDPM_CIFAR10_GFLOP, DDPM_CIFAR10_SOURCE
    else:
        nfe, gflop, source = sampling_cost(cfg, resolve(cfg.model))
    stride = FILTER_STRIDE if cfg.filtered else 1
    n_shards = len(plan_shards(count=cfg.count, test_count=cfg.test_count, shard_size=cfg.shard_size))
    threads = defaults.sampling_threads(device)
    seconds = defaults.estimate_seconds(cfg, device, images=cfg.count, nfe=nfe, gflop=gflop,
                                        threads=threads)
    here = [f"device:        {defaults.describe_device(cfg, device, threads=threads)}"
            + (f" ({', '.join(auto)} chosen for {device})" if auto else ""),
            f"time here:     about {defaults.format_seconds(seconds)} of sampling (estimate from "
            + ("measured GFLOP/s per CPU thread)" if device == "cpu" else "our sampler's H200 rate, one GPU)")]
    return "\n".join(here) + "\n" + describe(
        count=cfg.count, nfe=nfe, gflop=gflop, gflop_source=source, shards=n_shards,
        test_count=cfg.test_count, stride=stride)


def _in_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False
