"""Commands of the trainer: train (one world) and bootstrap (both worlds, gap, plot)."""

from __future__ import annotations

from collections.abc import Callable

import click

ARCHS = ("preresnet18", "mlp", "mcnn", "vit", "vgg11_bn")  # cifar5m.train.models.MODELS, listed without torch
ARCH_HELP = f"Model: {', '.join(ARCHS)}, or an MLP with the given hidden widths: 'mlp[512,512,512]'."
AUGMENT_HELP = ("On-device augmentation, identical in both worlds; the paper's --aug 0-3: none, flip, "
                "crop-flip (zero-padded crop 32 of 40 + flip), reflect-crop-flip (mirror-padded).")


def _run_options(command: Callable) -> Callable:
    """The options `train` and `bootstrap` share (every TrainConfig field)."""
    options = [
        click.option("--data", required=True, help="Dataset directory or URL (its train split is streamed)."),
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
        click.option("--lr-step-every", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Cosine: change the rate every K batches (the paper's code: 390, with "
                          "T // K levels; at T <= K the rate stays constant)."),
        click.option("--augment", type=click.Choice(["none", "flip", "crop-flip", "reflect-crop-flip"]),
                     default="none", show_default=True, help=AUGMENT_HELP),
        click.option("--class-balanced", is_flag=True, help="Real world: a class-balanced subset."),
        click.option("--wrap", is_flag=True,
                     help="Ideal world: allow more steps than one pass over the train split; samples "
                          "then repeat (recorded in config.json and result.json, marked on the plot)."),
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
                     show_default=True, help="auto: bf16 autocast on CUDA, fp32 on CPU; fp32 "
                                             "everywhere as the paper's code."),
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
    from cifar5m.cli.streaming import parse_storage_options
    from cifar5m.train.config import TrainConfig
    from cifar5m.train.metrics import parse_dense

    opts = dict(opts)
    opts["compile"] = opts.pop("compile_")
    opts["log_dense"] = parse_dense(opts["log_dense"])
    opts.pop("out")
    opts["storage_options"] = parse_storage_options(opts.get("storage_options"))
    return TrainConfig(world=world, seed=seed, **opts)


def _note_wrap(config) -> None:
    if config.wrap:
        click.echo("--wrap: past one pass over the train split the ideal world's samples repeat",
                   err=True)


@click.command("train")
@click.option("--world", type=click.Choice(["real", "ideal"]), required=True,
              help="real: N samples reused; ideal: every batch fresh.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--record-keys", is_flag=True, help="Write the keys of every batch (keys-rank*.txt).")
@click.option("--n", type=click.IntRange(min=1), help="Real world: samples reused (N).")
@click.option("--arch", default="preresnet18", show_default=True, help=ARCH_HELP)
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
    from cifar5m.train.trainer import train

    config = _config(world, seed, {**opts, "record_keys": record_keys})
    if world == "ideal":
        _note_wrap(config)
    result = train(config, out=opts["out"])
    _echo_final(result.rows, result.finished, opts["out"])


@click.command("bootstrap")
@click.option("--n", "ns", required=True, help="Real world sizes, comma-separated: 5000,10000,50000.")
@click.option("--arch", "archs", default="preresnet18", show_default=True,
              help="Models, comma-separated: preresnet18,mlp[512,512,512],mcnn. " + ARCH_HELP)
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds, e.g. 0,1,2.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.01,
              show_default=True, help="A real world has converged once its train soft error is below this.")
@_run_options
def bootstrap_cmd(ns: str, archs: str, seeds: str, threshold: float, **opts) -> None:
    """The Deep Bootstrap figure: the ideal world and the real world at every N, per model and seed.

    Every run's sample budget is checked before any training. The ideal world runs once
    per model and seed (it does not depend on N), the real world once per N. Finished
    runs are reused, so adding an N trains only that N; rerun the same command to resume.

    OUT/<model>/ideal-seed*/ and real-n*-seed*/ are normal `train` runs. OUT/bootstrap.png
    is the figure (per model: test soft error of the ideal world and of every N, the real
    worlds' train soft error dashed, a dot where each converges); gap.md / gap.csv the gap
    (real - ideal test soft error) at each N's convergence step and at T; curves.csv all rows.

    \b
    Examples:
      cifar5m bootstrap --data data/cifar5m --n 5000,10000,25000,50000 \\
          --arch preresnet18,mlp --seeds 0,1 --augment crop-flip --out runs/boot
      # the paper's exact schedule and augmentation (--aug 2), 100 epochs of 50K:
      cifar5m bootstrap --data data/cifar5m --n 50000 --steps 39000 --lr-step-every 390 \\
          --augment crop-flip --precision fp32 --out runs/paper
    """
    from cifar5m.train.bootstrap import run_bootstrap
    from cifar5m.train.config import BootstrapConfig

    models = split_archs(archs)
    config = BootstrapConfig(_config("ideal", 0, {**opts, "n": None, "arch": models[0]}),
                             ns=_ints(ns, "--n"), archs=models,
                             seeds=_ints(seeds, "--seeds"), threshold=threshold)
    _note_wrap(config.template)
    result = run_bootstrap(config, out=opts["out"])
    click.echo((result.out / "gap.md").read_text())
    click.echo(f"Trained {len(result.trained)} runs, reused {len(result.reused)} finished ones.")
    click.echo(f"Figure: {result.plot}")


def split_archs(text: str) -> tuple[str, ...]:
    """Comma-separated models; commas inside brackets belong to the model: 'mlp[8,8],mcnn'."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    parts = [p.strip() for p in parts if p.strip()]
    if not parts or depth:
        raise click.BadParameter(f"cannot read models from {text!r}", param_hint="--arch")
    return tuple(parts)


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v.replace("_", "")) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=name) from None
    if not values:
        raise click.BadParameter("give at least one value", param_hint=name)
    return values


def _echo_final(rows: list[dict], finished: bool, out: str) -> None:
    if not rows:
        return
    last = rows[-1]
    parts = [f"step {last['step']}"] + [f"{k} {v:.4f}" for k, v in last.items()
                                        if k.endswith("soft_error") or k.endswith("_error")]
    state = "finished" if finished else "stopped (rerun the same command to resume)"
    click.echo(f"{state}: " + ", ".join(parts) + f"; metrics in {out}/metrics.csv")
