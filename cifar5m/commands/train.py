"""Commands of the trainer: train (one world) and bootstrap (both worlds, gap, plot)."""

from __future__ import annotations

from collections.abc import Callable

import click

ARCHS = ("preresnet18", "mlp", "vit", "vgg11_bn")  # train.models.MODELS, listed without torch


def _run_options(command: Callable) -> Callable:
    """The options `train` and `bootstrap` share (every TrainConfig field)."""
    options = [
        click.option("--data", required=True, help="Dataset directory or URL (its train split is streamed)."),
        click.option("--n", type=click.IntRange(min=1), help="Real world: samples reused (N)."),
        click.option("--arch", default="preresnet18", show_default=True,
                     help=f"Model: {', '.join(ARCHS)} (train.models registry)."),
        click.option("--width", type=click.IntRange(min=1), help="Model width (default: the paper's)."),
        click.option("--steps", type=click.IntRange(min=1), default=39_000, show_default=True,
                     help="SGD steps T (39,000 = 100 epochs of 50K at batch 128)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Global batch size (over all ranks)."),
        click.option("--lr", type=float, default=0.1, show_default=True),
        click.option("--momentum", type=float, default=0.0, show_default=True),
        click.option("--weight-decay", type=float, default=0.0, show_default=True),
        click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine",
                     show_default=True, help="LR schedule over the T steps."),
        click.option("--augment", type=click.Choice(["none", "crop-flip"]), default="none",
                     show_default=True, help="On-device augmentation, identical in both worlds."),
        click.option("--class-balanced", is_flag=True, help="Real world: a class-balanced subset."),
        click.option("--log-every", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Evaluate every this many steps..."),
        click.option("--log-dense", default="1024:4,2048:8", show_default=True,
                     help="...and more often early: 'below:every,...' ('none' to disable)."),
        click.option("--test-split", default="test", show_default=True),
        click.option("--test-limit", type=click.IntRange(min=1), default=10_000, show_default=True,
                     help="Evaluate on the first this many test samples."),
        click.option("--cifar10-test", type=click.Path(exists=True, file_okay=False),
                     help="A dataset dir (`cifar5m import` of CIFAR-10) whose test split is also evaluated."),
        click.option("--train-eval-limit", type=click.IntRange(min=1),
                     help="Real world: train soft error on this many of the N (default: all)."),
        click.option("--eval-batch-size", type=click.IntRange(min=1), default=1000, show_default=True),
        click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, show_default=True),
        click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto",
                     show_default=True, help="auto: bf16 autocast on CUDA, fp32 on CPU."),
        click.option("--channels-last/--no-channels-last", default=True, show_default=True),
        click.option("--compile", "compile_", is_flag=True, help="torch.compile the model."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ..."),
        click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Loader processes reading and decoding shards."),
        click.option("--stop-after", type=click.IntRange(min=1),
                     help="Stop after this many steps (checkpointed; rerun to continue)."),
        click.option("--storage-options",
                     help='fsspec options for --data as JSON, e.g. \'{"client_kwargs": {"endpoint_url": '
                          '"http://127.0.0.1:9000"}}\' for s3:// (not saved: may hold credentials).'),
        click.option("--out", required=True, type=click.Path(file_okay=False),
                     help="Run directory (config.json, metrics.jsonl/csv, checkpoint.pt)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _config(world: str, seed: int, opts: dict):
    from cifar5m.commands.stream import parse_storage_options
    from train.metrics import parse_dense
    from train.trainer import TrainConfig

    opts = dict(opts)
    opts["compile"] = opts.pop("compile_")
    opts["log_dense"] = parse_dense(opts["log_dense"])
    opts.pop("out")
    opts["storage_options"] = parse_storage_options(opts.get("storage_options"))
    return TrainConfig(world=world, seed=seed, **opts)


@click.command("train")
@click.option("--world", type=click.Choice(["real", "ideal"]), required=True,
              help="real: N samples reused; ideal: every batch fresh.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--record-keys", is_flag=True, help="Write the keys of every batch (keys-rank*.txt).")
@_run_options
def train_cmd(world: str, seed: int, record_keys: bool, **opts) -> None:
    """Train a classifier in the real or the ideal world; resumes when rerun.

    Metrics (test soft error, error, loss; real world: train soft error) are written
    at log points to OUT/metrics.jsonl and metrics.csv next to OUT/config.json.
    Under torchrun each process takes a slice of every global batch (DDP).

    \b
    Examples:
      cifar5m train --data data/cifar5m --world real --n 50000 --out runs/real
      cifar5m train --data data/cifar5m --world ideal --out runs/ideal --augment crop-flip
      torchrun --nproc-per-node 8 -m cifar5m train --data data/cifar5m --world ideal --out runs/i8
    """
    from train.trainer import train

    config = _config(world, seed, {**opts, "record_keys": record_keys})
    result = train(config, out=opts["out"])
    _echo_final(result.rows, result.finished, opts["out"])


@click.command("bootstrap")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds, e.g. 0,1,2.")
@_run_options
def bootstrap_cmd(seeds: str, **opts) -> None:
    """Train both worlds with one config; write the gap table and the plot.

    OUT gets real-seed*/ and ideal-seed*/ runs, gap.csv, gap.md and bootstrap.png
    (test soft error of both worlds and train soft error of the real world).

    \b
    Example:
      cifar5m bootstrap --data data/cifar5m --n 50000 --arch preresnet18 --steps 39000 \\
          --out runs/boot --seeds 0,1,2 --cifar10-test data/cifar10
    """
    from train.bootstrap import BootstrapConfig, run_bootstrap

    if opts["n"] is None:
        raise click.UsageError("bootstrap needs --n (the real world's number of samples)")
    seed_list = tuple(int(s) for s in seeds.split(","))
    template = _config("real", seed_list[0], opts)
    result = run_bootstrap(BootstrapConfig(template, seed_list), out=opts["out"])
    click.echo((result.out / "gap.md").read_text())
    click.echo(f"Plot: {result.plot}")


def _echo_final(rows: list[dict], finished: bool, out: str) -> None:
    if not rows:
        return
    last = rows[-1]
    parts = [f"step {last['step']}"] + [f"{k} {v:.4f}" for k, v in last.items()
                                        if k.endswith("soft_error") or k.endswith("_error")]
    state = "finished" if finished else "stopped (rerun the same command to resume)"
    click.echo(f"{state}: " + ", ".join(parts) + f"; metrics in {out}/metrics.csv")
