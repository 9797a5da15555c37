"""``cifar5m demo``: the whole pipeline on the embedded defaults, offline first.

Generate with the builtin models, verify, serve the result on 127.0.0.1 and stream it back
over HTTP, then a Deep Bootstrap on the generated world itself: the ideal world draws fresh
generated samples, the real worlds reuse fixed subsets. With CIFAR-10 (given, or fetched from
its official archive when online) the demo also imports it, uses it as the quality report's
reference and runs the same comparison on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import click

BUILTIN_UNET = Path(__file__).resolve().parents[1] / "generator" / "builtin" / "unet" / "config.json"
TEST_FRACTION = 10  # every 10th generated image goes to the test split

# The Deep Bootstrap on the generated world: an MLP, batch 32, T = 84 steps. The ideal world sees
# 84 x 32 = 2,688 of the 2,700 generated training images once each (one true pass); the real
# worlds reuse N = 300 images ~9 times and N = 1,000 ~2.7 times. A short T: the point is the shape.
GENERATED_BOOTSTRAP = ["--n", "300,1000", "--arch", "mlp[256,256,256]", "--steps", "84",
                       "--batch-size", "32", "--log-every", "6", "--log-dense", "none"]
# The same on CIFAR-10, batch 128, T = 390: one pass over 49,920 of its 50,000 training images;
# N = 1,000 is reused 50 times (memorised by about step 200), N = 5,000 ten times.
CIFAR10_BOOTSTRAP = ["--n", "1000,5000", "--arch", "mlp[256,256,256]", "--steps", "390",
                     "--batch-size", "128", "--log-every", "30", "--log-dense", "none",
                     "--test-limit", "2000"]
# One thread: this small MLP ran 8x faster than with two threads on a busy 2-core machine (two
# threads wait on each other there); OMP_NUM_THREADS set by the user wins.
ONE_THREAD = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run_step(args: list[str], *, env: dict[str, str] | None = None) -> None:
    """Run one cifar5m command as a user would, echoing it first; stop on failure."""
    click.secho("$ cifar5m " + " ".join(args), fg="cyan", err=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cifar5m", *args], check=False,
                            env=None if env is None else {**os.environ, **env})
    if result.returncode != 0:
        raise click.ClickException(f"step `cifar5m {' '.join(args)}` failed (exit {result.returncode})")
    click.echo(f"  ({time.perf_counter() - start:.1f} s)", err=True)


def serve_and_stream(root: Path, name: str) -> None:
    """`cifar5m serve root` on a free port of 127.0.0.1, one pass of ``name`` streamed back
    over HTTP with the exactly-once check, then the server is stopped."""
    from cifar5m.dataset_server.launcher import free_port, wait_http

    port = free_port()
    args = ["serve", str(root), "--port", str(port), "--workers", "1", "--no-access-log"]
    click.secho(f"$ cifar5m {' '.join(args)} &", fg="cyan", err=True)
    server = subprocess.Popen([sys.executable, "-m", "cifar5m", *args])
    try:
        base = f"http://127.0.0.1:{port}/datasets/local/{name}/resolve/main"
        wait_http(f"{base}/manifest.json", server)
        run_step(["stream", base, "--batch-size", "256"])
    finally:
        server.terminate()
        server.wait(30)


def cifar10_archive(given: str | None) -> tuple[str | None, str]:
    """The CIFAR-10 archive to use and, when there is none, the line saying what was left out."""
    if given:
        return given, ""
    from cifar5m.core.errors import DownloadError
    from cifar5m.shards.cifar10_archive import fetch_cifar10

    try:
        return str(fetch_cifar10()), ""
    except DownloadError as exc:
        return None, (f"skipped: the CIFAR-10 reference and its real-vs-ideal figure ({exc}); add them "
                      f"when online, or with `make demo CIFAR10=path/to/cifar-10-python.tar.gz`")


@click.command("demo")
@click.option("--out", default="demo-output", show_default=True, type=click.Path(file_okay=False),
              help="Directory for every result.")
@click.option("--cifar10", type=click.Path(exists=True, dir_okay=False),
              help="A CIFAR-10 archive (the python tar.gz, or a JPEG tar.gz) [default: the official "
                   "archive, fetched once into the user cache when online].")
@click.option("--count", type=click.IntRange(min=1000), default=3000, show_default=True,
              help="Images to generate with the builtin models.")
def demo_cmd(out: str, cifar10: str | None, count: int) -> None:
    """Run the whole pipeline on the embedded defaults and print where the results are.

    Generates COUNT labelled images with the builtin generator and labeler, verifies
    them, serves them on 127.0.0.1 and streams them back over HTTP, writes grids and a
    quality report, and runs a short Deep Bootstrap on the generated world (an MLP in
    the ideal world and in real worlds of 300 and 1,000 images). With CIFAR-10 it also
    imports it and runs the same comparison there. Works offline; re-running reuses
    finished steps. Ends with a guide to the outputs.

    \b
    Example:
      cifar5m demo --out demo-output
      cifar5m demo --out demo-output --cifar10 cifar-10-python.tar.gz
    """
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if not BUILTIN_UNET.is_file():
        raise click.ClickException(f"the builtin models are not installed ({BUILTIN_UNET} is missing); "
                                   f"reinstall cifar5m")
    gen = root / "generated"
    # DPM-Solver++ at 10 steps in bf16 with oneDNN (--fast-cpu): ~300 image-steps/s on 2 idle
    # cores, so 3,000 images take about two minutes instead of hours.
    run_step(["generate", "--model", "builtin", "--labeler", "builtin", "--count", str(count),
              "--test-count", str(count // TEST_FRACTION), "--shard-size", "1000",
              "--sampler", "dpmsolver++", "--steps", "10", "--dtype", "bf16", "--fast-cpu",
              "--batch-size", "250", "--out", str(gen)])
    run_step(["verify", str(gen), "--decode"])
    run_step(["grid", str(gen), "-o", str(root / "generated-grid.png")])
    serve_and_stream(root, gen.name)
    archive, skipped = cifar10_archive(cifar10)
    ref = root / "cifar10"
    if archive:
        if not (ref / "manifest.json").is_file():
            run_step(["import", archive, "--out", str(ref), "--workers", "2"])
        run_step(["verify", str(ref)])
        run_step(["grid", str(ref), "-o", str(root / "cifar10-grid.png")])
    run_step(["report", str(gen), "--out", str(root / "report"), *(["--reference", str(ref)] if archive else [])])
    # The same settings with or without CIFAR-10, so a later run that adds it reuses this one.
    run_step(["bootstrap", "--data", str(gen), *GENERATED_BOOTSTRAP, "--test-limit", str(count // TEST_FRACTION),
              "--out", str(root / "bootstrap")], env=ONE_THREAD)
    if archive:
        run_step(["bootstrap", "--data", str(ref), *CIFAR10_BOOTSTRAP, "--out", str(root / "bootstrap-cifar10")],
                 env=ONE_THREAD)
    print_guide(root)
    if skipped:
        click.secho(skipped, fg="yellow")


GUIDE = [  # (path under --out, what it is), in the order to open them
    ("bootstrap/bootstrap.png", "OPEN FIRST: real vs ideal world on the generated data. Black: the "
     "ideal world (T steps, every batch fresh from the generated pool); colours: real worlds reusing "
     "N images for the same T steps; dashed: their train error; dot: where a real world has "
     "memorised its samples. The gap between a real world's test curve and the ideal one is the "
     "bootstrap gap"),
    ("bootstrap/gap.md", "the bootstrap gap (real - ideal test soft error) at convergence and at T"),
    ("bootstrap-cifar10/bootstrap.png", "the same comparison on CIFAR-10 (50,000 real images)"),
    ("generated-grid.png", "images made by the builtin generator, labelled by the builtin labeler"),
    ("cifar10-grid.png", "real CIFAR-10 images, for comparison"),
    ("report", "quality report of the generated dataset (index.html, class histogram, grids)"),
    ("generated", "the generated dataset (WebDataset shards + manifest + index): train and test"),
    ("cifar10", "CIFAR-10 imported into the same format"),
    ("bootstrap", "the runs behind the figure: config.json, metrics.csv per world and N; curves.csv"),
]
WHY = ("Why a real world can end below the ideal one: with a short T the ideal world sees each "
       "sample once and is still under-trained, while a real world of a few thousand samples has "
       "seen each several times; and soft error (1 - the probability given to the true class) "
       "rewards that confidence more than 0-1 error does. The paper's T is 100 epochs of 50K.")


def print_guide(root: Path) -> None:
    """What each output is, the one to open first at the top."""
    click.secho("\nResults (open the first one first):", bold=True)
    for name, what in GUIDE:
        if (root / name).exists():
            click.echo(f"  {root / name}\n      {what}")
    click.echo("\n" + WHY)
