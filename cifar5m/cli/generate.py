"""The ``generate`` command: sample, label and shard images from a diffusion model."""

from __future__ import annotations

import click

from cifar5m.generator.config import DEFAULT_MODEL, DEFAULT_STEPS, SAMPLERS
from cifar5m.generator.defaults import CPU_SAMPLER, CPU_STEPS, CUDA_SAMPLER
from cifar5m.shards.format import IMAGE_FORMATS

# Measured with benchmarks/cpu_kernels_bench.py (builtin UNet, DPM-Solver++, 2-core Xeon with AMX).
FAST_CPU_CLAIM = ("measured 6.1x the image-steps/s of --exact-cpu fp32 in bf16 (551 vs 91) and 2.2x "
                  "in fp32, builtin UNet, batch 256, 2 threads")


@click.command("generate")
@click.option("--count", type=click.IntRange(min=1), required=True,
              help="Samples in the dataset (train + test). A larger count extends an existing one.")
@click.option("--out", required=True,
              help="Output directory, or an fsspec URL (s3://..., gs://...) each rank writes to directly.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="UNet2DModel + scheduler config: Hub id, local directory, or 'builtin'.")
@click.option("--sampler", type=click.Choice(SAMPLERS),
              help="Sampling algorithm (see docs/generate.md for cost vs FID) [default: by device: "
                   f"{CUDA_SAMPLER} on CUDA, the CIFAR-5m setting; {CPU_SAMPLER} {CPU_STEPS} steps on CPU].")
@click.option("--steps", type=click.IntRange(min=1),
              help="Sampling steps = UNet calls per image [default: "
                   + ", ".join(f"{s} {n}" for s, n in DEFAULT_STEPS.items()) + "].")
@click.option("--labeler", help="Labeler: 'builtin', a cifar5m labeler directory, a transformers "
                                "image-classification model (Hub id[@revision] or directory), or "
                                "timm:MODEL_NAME:CHECKPOINT (docs/labelers.md); 'none' only for "
                                "class-conditional models.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Run seed; sample i's noise depends only on (seed, i).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per UNet call (capped at 2048). Does not change the images on CPU.")
@click.option("--shard-size", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Samples per shard.")
@click.option("--test-count", type=click.IntRange(min=0),
              help="The first this-many samples form the test split [default: 10,000 (the paper's) "
                   "from --count 60,000 up, else count/6; extending keeps the existing split].")
@click.option("--image-format", type=click.Choice(IMAGE_FORMATS), default="png", show_default=True,
              help="png: lossless, Hub-viewable; npy: raw uint8, faster to read.")
@click.option("--min-confidence", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True, help="Drop samples whose label has lower labeler probability.")
@click.option("--balance/--no-balance", default=False, show_default=True,
              help="Exactly size/10 samples of each class per shard (so count/10 per class).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda:LOCAL_RANK or cpu), cpu, cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True, help="UNet precision; auto: bf16 on CUDA and on CPUs with native bf16 "
                                      "(AMX/AVX512-BF16) under --fast-cpu, else fp32.")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the UNet [default: on for CUDA].")
@click.option("--exact-cpu/--fast-cpu", default=None,
              help="CPU only [default: --fast-cpu]. fast: oneDNN kernels, bit-exact only at equal "
                   f"batch size; {FAST_CPU_CLAIM}. exact: native kernels, images independent of "
                   "batch size and rank.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Background threads encoding and writing shards.")
@click.option("--staging", type=click.Path(file_okay=False),
              help="URL outputs: rank 0's local scratch directory for building the index "
                   "[default: the system temp directory].")
@click.option("--storage-options", help='URL outputs: fsspec options as JSON, e.g. '
                                        '\'{"client_kwargs": {"endpoint_url": "http://..."}}\'.')
@click.option("--break-lease", is_flag=True,
              help="URL outputs: take over the output from a job that was killed and left its "
                   "lease (only when that job is surely dead).")
@click.option("--dry-run", is_flag=True,
              help="Print the settings for this device, NFE per image, FLOPs, the estimated time here "
                   "and H100-hours; write nothing.")
def generate_cmd(count, out, model, sampler, steps, labeler, seed, batch_size, shard_size, test_count,
                 image_format, min_confidence, balance, device, dtype, compile_, exact_cpu, workers,
                 staging, storage_options, break_lease, dry_run) -> None:
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
    from cifar5m.cli.streaming import parse_storage_options
    from cifar5m.generator.config import GenerateConfig

    try:
        cfg = GenerateConfig(
            count=count, out=out, model=model, sampler=sampler, steps=steps, labeler=labeler,
            seed=seed, batch_size=batch_size, shard_size=shard_size, test_count=test_count,
            image_format=image_format, min_confidence=min_confidence, balance=balance,
            device=device, dtype=dtype, compile=compile_, exact_cpu=exact_cpu, workers=workers,
            staging=staging)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if dry_run:
        from cifar5m.generator.cost import dry_run as plan_dry_run

        click.echo(plan_dry_run(cfg))
        return
    from cifar5m.generator.pipeline import run

    manifest = run(cfg, storage_options=parse_storage_options(storage_options), break_lease=break_lease)
    if manifest is not None:
        n = sum(s.samples for s in manifest.shards)
        click.echo(f"wrote {n:,} samples in {len(manifest.shards)} shards to {out}")
