"""Commands of the trainer: train (one world) and bootstrap (both worlds, gap, plot)."""

from __future__ import annotations

from collections.abc import Callable

import click

from cifar5m.cli.options import config_option, field_default, storage_options_option
from cifar5m.train.config import (
    ARCHS,
    AUGMENTATIONS,
    BootstrapConfig,
    TrainConfig,
    format_dense,
    parse_dense,
)

ARCH_HELP = f"Model: {', '.join(ARCHS)}, or an MLP with the given hidden widths: 'mlp[512,512,512]'."
AUGMENT_HELP = ("On-device augmentation, identical in both worlds; the paper's --aug 0-3: none, flip, "
                "crop-flip (zero-padded crop 32 of 40 + flip), reflect-crop-flip (mirror-padded).")


def _run_options(command: Callable) -> Callable:
    """The options `train` and `bootstrap` share (every TrainConfig field), defaults from it."""
    T = TrainConfig
    options = [
        config_option(T, "data", required=True, help="Dataset directory or URL (its train split is streamed)."),
        config_option(T, "width", type=click.IntRange(min=1), help="Model width (default: the paper's)."),
        config_option(T, "steps", type=click.IntRange(min=1),
                      help="SGD steps T (39,000 = 100 epochs of 50K at batch 128)."),
        config_option(T, "batch_size", type=click.IntRange(min=1), help="Global batch size (over all ranks)."),
        config_option(T, "lr", type=float),
        config_option(T, "momentum", type=float),
        config_option(T, "weight_decay", type=float),
        config_option(T, "schedule", type=click.Choice(["cosine", "constant"]), help="LR schedule over the T steps."),
        config_option(T, "lr_step_every", type=click.IntRange(min=1),
                      help="Cosine: change the rate every K batches (the paper's code: 390, with "
                           "T // K levels; at T <= K the rate stays constant)."),
        config_option(T, "augment", type=click.Choice(AUGMENTATIONS), help=AUGMENT_HELP),
        config_option(T, "class_balanced", is_flag=True, help="Real world: a class-balanced subset."),
        config_option(T, "wrap", is_flag=True,
                      help="Ideal world: allow more steps than one pass over the train split; samples "
                           "then repeat (recorded in config.json and result.json, marked on the plot)."),
        config_option(T, "log_every", type=click.IntRange(min=1), help="Evaluate every this many steps..."),
        click.option("--log-dense", "log_dense", show_default=True,
                     default=format_dense(field_default(T, "log_dense")),
                     callback=_dense,
                     help="...and more often early: 'below:every,...' ('none' to disable)."),
        config_option(T, "test_split"),
        config_option(T, "test_limit", type=click.IntRange(min=1),
                      help="Evaluate on the first this many test samples."),
        config_option(T, "cifar10_test", type=click.Path(exists=True, file_okay=False),
                      help="A dataset dir (`cifar5m import` of CIFAR-10) whose test split is also evaluated."),
        config_option(T, "train_eval_limit", type=click.IntRange(min=1),
                      help="Real world: train soft error on this many of the N (default: all)."),
        config_option(T, "eval_batch_size", type=click.IntRange(min=1)),
        config_option(T, "checkpoint_every", type=click.IntRange(min=1)),
        config_option(T, "precision", type=click.Choice(["auto", "bf16", "fp32"]),
                      help="auto: bf16 autocast on CUDA, fp32 on CPU; fp32 everywhere as the paper's code."),
        config_option(T, "channels_last", "--channels-last/--no-channels-last", show_default=True),
        config_option(T, "compile", is_flag=True, help="torch.compile the model."),
        config_option(T, "device", help="auto, cpu, cuda, cuda:1, ..."),
        config_option(T, "num_workers", type=click.IntRange(min=0),
                      help="Loader processes reading and decoding shards."),
        config_option(T, "stop_after", type=click.IntRange(min=1),
                      help="Stop after this many steps (checkpointed; rerun to continue)."),
        storage_options_option('fsspec options for --data as JSON, e.g. \'{"client_kwargs": {"endpoint_url": '
                               '"http://127.0.0.1:9000"}}\' for s3:// (not saved: may hold credentials).'),
        click.option("--out", required=True, type=click.Path(file_okay=False),
                     help="Run directory (config.json, metrics.jsonl/csv, checkpoint.pt)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _dense(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[tuple[int, int], ...]:
    try:
        return parse_dense(value)
    except ValueError:
        raise click.BadParameter(f"expected 'below:every,...' such as 1024:4,2048:8, got {value!r}") from None


def _note_wrap(config) -> None:
    if config.wrap:
        click.echo("--wrap: past one pass over the train split the ideal world's samples repeat",
                   err=True)


@click.command("train")
@config_option(TrainConfig, "world", type=click.Choice(["real", "ideal"]), required=True,
               help="real: N samples reused; ideal: every batch fresh.")
@config_option(TrainConfig, "seed", type=int)
@config_option(TrainConfig, "record_keys", is_flag=True,
               help="Write the keys of every batch (keys-rank*.txt).")
@config_option(TrainConfig, "n", type=click.IntRange(min=1), help="Real world: samples reused (N).")
@config_option(TrainConfig, "arch", help=ARCH_HELP)
@_run_options
def train_cmd(out: str, **fields) -> None:
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

    config = TrainConfig(**fields)
    if config.world == "ideal":
        _note_wrap(config)
    result = train(config, out=out)
    _echo_final(result.rows, result.finished, out)


@click.command("bootstrap")
@click.option("--n", "ns", required=True, help="Real world sizes, comma-separated: 5000,10000,50000.")
@click.option("--arch", "archs", default=field_default(TrainConfig, "arch"), show_default=True,
              help="Models, comma-separated: preresnet18,mlp[512,512,512],mcnn. " + ARCH_HELP)
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds, e.g. 0,1,2.")
@config_option(BootstrapConfig, "threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True),
               help="A real world has converged once its train soft error is below this.")
@_run_options
def bootstrap_cmd(ns: str, archs: str, seeds: str, threshold: float, out: str, **fields) -> None:
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

    models = split_archs(archs)
    config = BootstrapConfig(TrainConfig(world="ideal", arch=models[0], **fields),
                             ns=_ints(ns, "--n"), archs=models,
                             seeds=_ints(seeds, "--seeds"), threshold=threshold)
    _note_wrap(config.template)
    result = run_bootstrap(config, out=out)
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
