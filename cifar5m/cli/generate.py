"""The ``generate`` command: sample, label and shard images from a diffusion model."""

from __future__ import annotations

import click

from cifar5m.cli.options import config_option, storage_options_option
from cifar5m.generator.config import DEFAULT_STEPS, SAMPLERS, GenerateConfig
from cifar5m.generator.defaults import CPU_SAMPLER, CPU_STEPS, CUDA_SAMPLER
from cifar5m.shards.format import IMAGE_FORMATS

# Measured with benchmarks/cpu_kernels_bench.py (builtin UNet, DPM-Solver++, 2-core Xeon with AMX).
FAST_CPU_CLAIM = ("measured 6.1x the image-steps/s of --exact-cpu fp32 in bf16 (551 vs 91) and 2.2x "
                  "in fp32, builtin UNet, batch 256, 2 threads")


@click.command("generate")
@config_option(GenerateConfig, "count", type=click.IntRange(min=1), required=True,
              help="Samples in the dataset (train + test). A larger count extends an existing one.")
@config_option(GenerateConfig, "out", required=True,
              help="Output directory, or an fsspec URL (s3://..., gs://...) each rank writes to directly.")
@config_option(GenerateConfig, "model",
              help="UNet2DModel + scheduler config: Hub id, local directory, or 'builtin'.")
@config_option(GenerateConfig, "sampler", type=click.Choice(SAMPLERS),
              help="Sampling algorithm (see docs/generate.md for cost vs FID) [default: by device: "
                   f"{CUDA_SAMPLER} on CUDA, the CIFAR-5m setting; {CPU_SAMPLER} {CPU_STEPS} steps on CPU].")
@config_option(GenerateConfig, "steps", type=click.IntRange(min=1),
              help="Sampling steps = UNet calls per image [default: "
                   + ", ".join(f"{s} {n}" for s, n in DEFAULT_STEPS.items()) + "].")
@config_option(GenerateConfig, "labeler", help="Labeler: 'builtin', a cifar5m labeler directory, a transformers "
                                "image-classification model (Hub id[@revision] or directory), or "
                                "timm:MODEL_NAME:CHECKPOINT (docs/labelers.md); 'none' only for "
                                "class-conditional models.")
@config_option(GenerateConfig, "seed", type=click.IntRange(min=0),
              help="Run seed; sample i's noise depends only on (seed, i).")
@config_option(GenerateConfig, "batch_size", type=click.IntRange(min=1),
              help="Images per UNet call (capped at 2048). Does not change the images on CPU.")
@config_option(GenerateConfig, "shard_size", type=click.IntRange(min=1),
              help="Samples per shard.")
@config_option(GenerateConfig, "test_count", type=click.IntRange(min=0),
              help="The first this-many samples form the test split [default: 10,000 (the paper's) "
                   "from --count 60,000 up, else count/6; extending keeps the existing split].")
@config_option(GenerateConfig, "image_format", type=click.Choice(IMAGE_FORMATS),
              help="png: lossless, Hub-viewable; npy: raw uint8, faster to read.")
@config_option(GenerateConfig, "min_confidence", type=click.FloatRange(0, 1, max_open=True),
              help="Drop samples whose label has lower labeler probability.")
@config_option(GenerateConfig, "balance", "--balance/--no-balance", show_default=True,
              help="Exactly size/10 samples of each class per shard (so count/10 per class).")
@config_option(GenerateConfig, "device", help="auto (cuda:LOCAL_RANK or cpu), cpu, cuda:N.")
@config_option(GenerateConfig, "dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="UNet precision; auto: bf16 on CUDA and on CPUs with native bf16 "
                                      "(AMX/AVX512-BF16) under --fast-cpu, else fp32.")
@config_option(GenerateConfig, "compile", "--compile/--no-compile",
              help="torch.compile the UNet [default: on for CUDA].")
@config_option(GenerateConfig, "exact_cpu", "--exact-cpu/--fast-cpu",
              help="CPU only [default: --fast-cpu]. fast: oneDNN kernels, bit-exact only at equal "
                   f"batch size; {FAST_CPU_CLAIM}. exact: native kernels, images independent of "
                   "batch size and rank.")
@config_option(GenerateConfig, "workers", type=click.IntRange(min=1),
              help="Background threads encoding and writing shards.")
@config_option(GenerateConfig, "staging", type=click.Path(file_okay=False),
              help="URL outputs: rank 0's local scratch directory for building the index "
                   "[default: the system temp directory].")
@storage_options_option('URL outputs: fsspec options as JSON, e.g. '
                        '\'{"client_kwargs": {"endpoint_url": "http://..."}}\'.')
@click.option("--break-lease", is_flag=True,
              help="URL outputs: take over the output from a job that was killed and left its "
                   "lease (only when that job is surely dead).")
@click.option("--dry-run", is_flag=True,
              help="Print the settings for this device, NFE per image, FLOPs, the estimated time here "
                   "and H100-hours; write nothing.")
def generate_cmd(storage_options: dict | None, break_lease: bool, dry_run: bool, **fields) -> None:
    """Generate a CIFAR-5m-style dataset: sample a diffusion UNet, label, write shards.

    Re-running the same command resumes a killed run (finished shards are checked
    and kept); a larger --count extends a finished dataset; other settings are
    refused. Under torchrun, ranks write disjoint shards and rank 0 finalises; with
    an s3:// (or other fsspec) --out each rank uploads its own shards, so nodes need
    no shared disk (docs/generate.md, "Several nodes").

    Settings left out are chosen by the device and printed in one line at start,
    with the estimated time: on CUDA DDPM 1000 steps in bf16, compiled (the CIFAR-5m
    setting); on CPU DPM-Solver++ 20 steps with oneDNN kernels, bf16 where native.

    \b
    Examples:
      # CPU, builtin models: 200 images in about a minute on 2 cores
      cifar5m generate --count 200 --model builtin --labeler builtin --out data/tiny
      # 6M images on GPUs: plan first, then run
      cifar5m generate --count 6000000 --out data/cifar5m-ddim --sampler ddim \\
          --steps 100 --labeler builtin --batch-size 1024 --dry-run
      torchrun --nproc-per-node 8 -m cifar5m generate --count 6000000 \\
          --out data/cifar5m-ddim --sampler ddim --steps 100 --labeler builtin
      torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d \\
          --rdzv-endpoint node001:29500 --rdzv-id gen1 -m cifar5m generate \\
          --count 6000000 --out s3://bucket/cifar5m-ddim --sampler ddim --steps 100 \\
          --labeler builtin
    """
    try:
        cfg = GenerateConfig(**fields)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if dry_run:
        from cifar5m.generator.cost import dry_run as plan_dry_run

        click.echo(plan_dry_run(cfg))
        return
    from cifar5m.generator.pipeline import run

    manifest = run(cfg, storage_options=storage_options, break_lease=break_lease)
    if manifest is not None:
        n = sum(s.samples for s in manifest.shards)
        click.echo(f"wrote {n:,} samples in {len(manifest.shards)} shards to {cfg.out}")
