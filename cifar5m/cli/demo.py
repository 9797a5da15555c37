"""``cifar5m demo``: the main job end to end on the embedded defaults, offline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import click

BUILTIN_UNET = Path(__file__).resolve().parents[1] / "generator" / "builtin" / "unet" / "config.json"


# The demo's Deep Bootstrap: an MLP on CIFAR-10, batch 128, T = 390 steps. The ideal world sees
# 390 x 128 = 49,920 of the 50,000 training images once each (one true pass); the real world at
# N = 1,000 reuses its samples 50 times and memorises them (train soft error < 0.01 by about
# step 200), at N = 5,000 ten times. Evaluated on 2,000 CIFAR-10 test images every 30 steps.
BOOTSTRAP = ["--n", "1000,5000", "--arch", "mlp[256,256,256]", "--steps", "390", "--batch-size", "128",
             "--log-every", "30", "--log-dense", "none", "--test-limit", "2000"]


def run_step(args: list[str], *, env: dict[str, str] | None = None) -> None:
    """Run one cifar5m command as a user would, echoing it first; stop on failure."""
    click.secho("$ cifar5m " + " ".join(args), fg="cyan", err=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cifar5m", *args], check=False,
                            env=None if env is None else {**os.environ, **env})
    if result.returncode != 0:
        raise click.ClickException(f"step `cifar5m {' '.join(args)}` failed (exit {result.returncode})")
    click.echo(f"  ({time.perf_counter() - start:.1f} s)", err=True)


@click.command("demo")
@click.option("--out", default="demo-output", show_default=True, type=click.Path(file_okay=False),
              help="Directory for every result.")
@click.option("--cifar10", type=click.Path(exists=True, dir_okay=False),
              help="CIFAR-10 JPEG tar.gz (the reference for the quality report).")
@click.option("--count", type=click.IntRange(min=10), default=3000, show_default=True,
              help="Images to generate with the builtin models.")
def demo_cmd(out: str, cifar10: str | None, count: int) -> None:
    """Run the main job on the embedded defaults and print where the results are.

    Imports CIFAR-10 (the reference), generates COUNT labelled images with the
    builtin generator and labeler, verifies both datasets, writes sample grids and
    the quality report, and runs a short Deep Bootstrap on CIFAR-10 (an MLP in the
    ideal world and in real worlds of 1,000 and 5,000 images). Offline; re-running
    resumes or reuses finished steps. Ends with a guide to the outputs.

    \b
    Example:
      cifar5m demo --out demo-output --cifar10 cifar10-jpeg.tar.gz
    """
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if cifar10:
        ref = root / "cifar10"
        if not (ref / "manifest.json").is_file():
            run_step(["import", cifar10, "--out", str(ref), "--workers", "2"])
        run_step(["verify", str(ref)])
        run_step(["info", str(ref)])
        run_step(["grid", str(ref), "-o", str(root / "cifar10-grid.png")])
    if BUILTIN_UNET.is_file():
        gen = root / "generated"
        # DPM-Solver++ at 10 steps in bf16 with oneDNN (--fast-cpu): ~300 image-steps/s
        # on 2 cores, so 3,000 images take about two minutes instead of hours.
        run_step(["generate", "--model", "builtin", "--labeler", "builtin", "--count", str(count),
                  "--test-count", str(max(count // 10, 1)), "--shard-size", "1000",
                  "--sampler", "dpmsolver++", "--steps", "10", "--dtype", "bf16", "--fast-cpu",
                  "--batch-size", "250", "--out", str(gen)])
        run_step(["verify", str(gen), "--decode"])
        run_step(["info", str(gen)])
        run_step(["grid", str(gen), "-o", str(root / "generated-grid.png")])
        report = ["report", str(gen), "--out", str(root / "report")]
        run_step(report + (["--reference", str(root / "cifar10")] if cifar10 else []))
    else:
        click.echo("builtin models not found: skipped generation", err=True)
    if cifar10:
        boot = root / "bootstrap"
        # One thread: this small MLP ran 8x faster than with two threads on a busy 2-core machine
        # (two threads wait on each other there); OMP_NUM_THREADS set by the user wins.
        run_step(["bootstrap", "--data", str(root / "cifar10"), *BOOTSTRAP, "--out", str(boot)],
                 env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    print_guide(root)


GUIDE = [  # (path under --out, what it is), in the order to open them
    ("bootstrap/bootstrap.png", "OPEN FIRST: the Deep Bootstrap on CIFAR-10. Black: ideal world (every "
     "batch fresh); colours: real worlds reusing N = 1,000 / 5,000 images; dashed: their train "
     "error; dot: where a real world has memorised its samples"),
    ("bootstrap/gap.md", "the bootstrap gap (real - ideal test soft error) at convergence and at T"),
    ("generated-grid.png", "images made by the builtin generator, labelled by the builtin labeler"),
    ("cifar10-grid.png", "real CIFAR-10 images, for comparison"),
    ("report", "quality report of the generated dataset (index.html, class histogram, grids)"),
    ("generated", "the generated dataset (WebDataset shards + manifest + index): train and test"),
    ("cifar10", "CIFAR-10 imported into the same format"),
    ("bootstrap", "the runs behind the figure: config.json, metrics.csv per world and N; curves.csv"),
]


def print_guide(root: Path) -> None:
    """What each output is, the one to open first at the top."""
    click.secho("\nResults (open the first one first):", bold=True)
    for name, what in GUIDE:
        if (root / name).exists():
            click.echo(f"  {root / name}\n      {what}")
