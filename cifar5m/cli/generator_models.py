"""Commands that train the models and describe datasets: train-labeler, train-generator, report."""

from __future__ import annotations

import json

import click


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@click.command("train-labeler")
@click.argument("data", type=str)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Labeler directory to write.")
@click.option("--arch", type=click.Choice(["airbench", "tiny"]), default="airbench", show_default=True)
@click.option("--widths", default="64,256,256", show_default=True,
              help="airbench: channels of the three conv groups (64,256,256 = airbench94).")
@click.option("--epochs", type=float, default=10.0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--lr", type=float, default=11.5, show_default=True, help="Per 1024 images (airbench scaling).")
@click.option("--label-smoothing", type=float, default=0.2, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True, help="auto: bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--compile/--no-compile", default=False, show_default=True, help="torch.compile the net.")
@click.option("--max-train", type=click.IntRange(min=1), help="Use a class-balanced subset of the train split.")
@click.option("--max-test", type=click.IntRange(min=1), help="Evaluate on a class-balanced test subset.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--work", type=click.Path(file_okay=False), help="Checkpoint directory [default: OUT-work].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", help="cpu, cuda, cuda:1 [default: cuda if available].")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads.")
def train_labeler_cmd(data, out, arch, widths, epochs, batch_size, lr, label_smoothing, precision, compile,
                      max_train, max_test, checkpoint_every, work, seed, device, threads) -> None:
    """Train a CIFAR-10 labeler (airbench-style) on DATA and save it to --out.

    DATA is a cifar5m dataset with train and test splits (e.g. CIFAR-10 made by
    `cifar5m import`). Reports test accuracy (flip TTA) and writes the labeler
    format that `generate --labeler` reads. A killed run resumes from its last
    checkpoint when the same command is run again.

    \b
    Examples:
      cifar5m import cifar10-jpeg.tar.gz --out data/cifar10 --image-format npy
      cifar5m train-labeler data/cifar10 --out models/labeler          # GPU: airbench94
      cifar5m train-labeler data/cifar10 --out lab --widths 32,64,128 --epochs 6 --batch-size 512
    """
    import torch

    from cifar5m.generator.training.labeler_recipe import LabelerTrainConfig, train_labeler

    if threads:
        torch.set_num_threads(threads)
    cfg = LabelerTrainConfig(data=data, out=out, arch=arch, widths=_ints(widths), epochs=epochs,
                             batch_size=batch_size, lr=lr, label_smoothing=label_smoothing, seed=seed,
                             max_train=max_train, max_test=max_test, checkpoint_every=checkpoint_every,
                             precision=precision, compile=compile, work=work)
    metrics = train_labeler(cfg, device=device)
    click.echo(f"test accuracy {metrics['test_accuracy']:.2%} on {metrics['test_samples']} images of {data} "
               f"(train {metrics['train_seconds']:.0f} s on {metrics['device']}); wrote {out}")


@click.command("train-generator")
@click.argument("data", type=str)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model directory (diffusers format).")
@click.option("--channels", default="128,256,256,256", show_default=True, help="block_out_channels.")
@click.option("--layers-per-block", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--attention-levels", default="1", show_default=True,
              help="Levels with self-attention (0 = 32x32, 1 = 16x16, ...); empty for none.")
@click.option("--norm-groups", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--dropout", type=float, default=0.1, show_default=True)
@click.option("--timesteps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--beta-schedule", type=click.Choice(["linear", "scaled_linear", "squaredcos_cap_v2"]),
              default="linear", show_default=True)
@click.option("--beta-start", type=float, default=1e-4, show_default=True)
@click.option("--beta-end", type=float, default=0.02, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Global batch (divided over torchrun ranks).")
@click.option("--warmup", type=click.IntRange(min=0), default=5000, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True)
@click.option("--ema-decay", type=float, default=0.9999, show_default=True)
@click.option("--ema-warmup/--no-ema-warmup", default=False, show_default=True,
              help="Use decay min(ema_decay, (1+step)/(10+step)): for short runs.")
@click.option("--steps", type=click.IntRange(min=1), default=800_000, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--sample-every", type=click.IntRange(min=0), default=5000, show_default=True,
              help="Write a DDIM sample grid PNG to WORK/samples every K steps (0: never).")
@click.option("--sample-steps", type=click.IntRange(min=1), default=50, show_default=True,
              help="DDIM steps for the sample grids.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@click.option("--compile/--no-compile", default=False, show_default=True)
@click.option("--max-train", type=click.IntRange(min=1), help="Train on a class-balanced subset.")
@click.option("--work", type=click.Path(file_okay=False), help="Checkpoints and grids [default: OUT-work].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads.")
def train_generator_cmd(data, out, channels, layers_per_block, attention_levels, norm_groups, dropout,
                        timesteps, beta_schedule, beta_start, beta_end, lr, batch_size, warmup, grad_clip,
                        ema_decay, ema_warmup, steps, checkpoint_every, sample_every, sample_steps, precision, compile,
                        max_train, work, seed, threads) -> None:
    """Train a DDPM UNet2DModel on DATA; save EMA weights + scheduler to --out.

    The defaults are Ho et al.'s CIFAR-10 model (35.7M parameters, 1000 steps,
    linear betas 1e-4..0.02, Adam 2e-4, batch 128, 800k steps). Resumes exactly
    from WORK/checkpoint.pt; --steps may be raised to train longer. Multi-GPU:
    run it under torchrun.

    \b
    Examples:
      cifar5m train-generator data/cifar10 --out models/ddpm
      torchrun --nproc-per-node 8 -m cifar5m train-generator data/cifar10 --out models/ddpm
      cifar5m train-generator data/cifar10 --out small --channels 24,48,96 --layers-per-block 1 \\
          --attention-levels 2 --norm-groups 8 --dropout 0 --lr 1e-3 --batch-size 64 --ema-decay 0.999 --ema-warmup
    """
    import torch

    from cifar5m.generator.training.unet import UNetTrainConfig, train_generator

    if threads:
        torch.set_num_threads(threads)
    cfg = UNetTrainConfig(
        data=data, out=out, block_out_channels=_ints(channels), layers_per_block=layers_per_block,
        attention_levels=_ints(attention_levels), norm_num_groups=norm_groups, dropout=dropout,
        num_train_timesteps=timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
        beta_end=beta_end, lr=lr, batch_size=batch_size, warmup_steps=warmup, grad_clip=grad_clip,
        ema_decay=ema_decay, ema_warmup=ema_warmup, steps=steps, checkpoint_every=checkpoint_every,
        sample_every=sample_every, sample_steps=sample_steps, precision=precision, compile=compile, max_train=max_train,
        work=work, seed=seed)
    from cifar5m.generator import rendezvous

    metrics = train_generator(cfg)
    if rendezvous.from_env().is_main:
        click.echo(f"trained {metrics['steps']} steps in {metrics['train_seconds']:.0f} s; wrote {out}")


@click.command("report")
@click.argument("root", type=str)
@click.option("--out", type=click.Path(file_okay=False), help="Report directory [default: ROOT/report].")
@click.option("--split", default="train", show_default=True)
@click.option("--per-class", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images in each per-class grid.")
@click.option("--reference", help="Dataset (e.g. CIFAR-10) whose test split the distances compare against.")
@click.option("--labeler", default="builtin", show_default=True, help="Labeler for the feature-space distance.")
@click.option("--max-samples", type=click.IntRange(min=2), default=10_000, show_default=True,
              help="Samples per side for the distances.")
@click.option("--fid-weights", type=click.Path(dir_okay=False),
              help="Local Inception-v3 FID weights; FID needs torch-fidelity. Nothing is downloaded.")
@click.option("--seed", type=int, default=0, show_default=True)
def report_cmd(root, out, split, per_class, reference, labeler, max_samples, fid_weights, seed) -> None:
    """Describe a dataset: class and confidence histograms, per-class grids, summary.

    Writes PNGs, summary.json and summary.txt. With --reference, adds a Frechet
    distance in the labeler's feature space (works offline; NOT comparable to
    published FID) and, with --fid-weights and torch-fidelity, real FID.

    \b
    Example:
      cifar5m report data/synthetic --reference data/cifar10
    """
    from pathlib import Path

    from cifar5m.generator.report.summary import ReportConfig, make_report, render_text

    cfg = ReportConfig(root=root, out=out or str(Path(root) / "report"), split=split, per_class=per_class,
                       reference=reference, labeler=labeler, max_samples=max_samples,
                       fid_weights=fid_weights, seed=seed)
    summary = make_report(cfg)
    click.echo(render_text(summary), nl=False)
    click.echo(f"wrote {cfg.out}/ (summary.json: {len(json.dumps(summary, default=str))} bytes)")
