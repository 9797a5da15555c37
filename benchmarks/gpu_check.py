"""Every GPU measurement of the project as one prepared script, paced for a 15-minute lease.

    python benchmarks/gpu_check.py --cifar10 cifar10-jpeg.tar.gz --budget 430 --work /tmp/w --out $OUT
    python benchmarks/gpu_check.py --cifar10 cifar10-jpeg.tar.gz --smoke  # CPU, toy sizes
    python benchmarks/gpu_check.py --cifar10 cifar10-jpeg.tar.gz --only science --budget 480  # ~8 min

Parts, in priority order. Each starts only when the time left allows it, and a failing part
is reported and skipped so that one bug does not waste the lease. ``science`` needs about 8
minutes and is not in the default ``--only``: run it alone (second line above).

=========  ============================================================================
data       ``cifar5m import`` of the CIFAR-10 JPEG copy as npy shards
labeler    ``gpu_models.train_labelers``: airbench-style sweep (>= 91 % in < 60 s)
train      ``gpu_train.bench``: ResNet-18 fed from shards vs compute-only (>= 90 %)
science    ``gpu_train.science``: generate 1M images (builtin UNet), bootstrap sweep N=10K,50K, T=7,800
stream     ``cifar5m stream`` on that machine's CPUs, 0/1/4 workers (cores per 46k img/s)
generate   ``gpu_generate``: end-to-end generation vs DDPMPipeline fp16 (>= 2.5x)
hublabel   ``gpu_labelers``: ViT-B/16 224 px bf16 labeling img/s per batch vs the sampler's rate
unet       ``gpu_models.train_small_generator``: the builtin UNet, trained until the deadline
serve      ``serve_bench.py`` on that machine's CPUs (no GPU): room for server and clients
=========  ============================================================================

Everything that comes back is written under ``--out`` (the device tool returns 8 files):
``results.jsonl`` (one line per result, written as it goes), ``models.tar`` (chosen
labeler + UNet, for ``generator/builtin``) and ``science.tar`` (plot, curves, gap table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import gpu_generate  # noqa: E402
import gpu_labelers  # noqa: E402
import gpu_models  # noqa: E402
import gpu_train  # noqa: E402
from gpu_models import Deadline, log  # noqa: E402

# Seconds each part needs before it is worth starting (H200 estimates; the UNet takes the rest).
NEEDS = {"data": 0, "labeler": 45, "train": 60, "science": 420, "stream": 20, "generate": 120, "hublabel": 60,
         "unet": 90, "serve": 150}
UNET_RESERVE = 25  # seconds kept after the UNet's last chunk: final save, sample grid, tar


def part(name: str, deadline: Deadline, fn, *, smoke: bool) -> object:
    if not smoke and deadline.left() < NEEDS[name]:
        log(name, {"status": "skipped", "left_s": round(deadline.left())})
        return None
    t0 = time.perf_counter()
    try:
        result = fn()
        log(name, {"status": "ok", "seconds": round(time.perf_counter() - t0, 1), "left_s": round(deadline.left())})
        return result
    except Exception as e:  # report and move on: the lease is short
        traceback.print_exc()
        log(name, {"status": "failed", "error": repr(e)[:500], "seconds": round(time.perf_counter() - t0, 1)})
        return None


def stream_rates(data: Path, *, smoke: bool) -> None:
    """Images/s of ``cifar5m stream`` (npy shards, ideal world, wrapped) per worker count."""
    steps = "8" if smoke else "400"
    for workers in (0, 1) if smoke else (0, 1, 4):
        cmd = [sys.executable, "-m", "cifar5m", "stream", str(data), "--batch-size", "512", "--wrap",
               "--steps", steps, "--workers", str(workers)]
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, timeout=120)
        log(f"stream workers={workers}", {"rc": run.returncode, "stdout": run.stdout[-600:],
                                            "stderr": run.stderr[-300:]})


def serve_rates(*, smoke: bool) -> None:
    """``serve_bench.py`` where server and clients need not share two cores: nginx and
    ``cifar5m serve`` with 8 workers on the mix, 32 clients in 6 processes."""
    seconds, procs = ("2", "1") if smoke else ("20", "6")
    cmd = [sys.executable, str(HERE / "serve_bench.py"), "--seconds", seconds, "--client-procs", procs,
           "--workers", "8", "--servers", "nginx", "cifar5m serve", "--mixes", "mix"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, timeout=400)
    log("serve_bench", {"rc": run.returncode, "stdout": run.stdout[-5000:], "stderr": run.stderr[-800:]})


def keep_after(name: str, only: list[str]) -> float:
    """Seconds the parts after ``name`` need (a part may only use what is left beyond them);
    NEEDS lists the parts in the order they run."""
    order = list(NEEDS)
    return sum(NEEDS[k] for k in order[order.index(name) + 1:] if k in only)


def best_labeler(results: dict[str, dict] | None) -> str | None:
    """The builtin candidate if it trained, else the most accurate run."""
    if not results:
        return None
    builtin = [k for k in results if k.startswith("builtin")]
    if builtin:
        return builtin[0]
    return max(results, key=lambda k: results[k]["test_accuracy"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar10", required=True, help="the CIFAR-10 JPEG tar.gz (or a cifar5m dataset dir)")
    p.add_argument("--budget", type=float, default=430, help="seconds for all parts together")
    # science (~8 min: 1M generated images, then three ResNet-18 runs) runs alone: --only science
    p.add_argument("--only", default="labeler,train,stream,generate,hublabel,unet")
    p.add_argument("--work", default="gpu-work", help="scratch directory (not returned)")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-output"))
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes: checks this script runs")
    args = p.parse_args(argv)
    deadline = Deadline(args.budget)
    import torch

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    gpu_models.RESULTS = out / "results.jsonl"
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU (use --smoke on CPU)")
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    log("device", {"card": card, "torch": torch.__version__, "python": sys.version.split()[0],
                   "cpus": os.cpu_count(), "budget_s": args.budget})
    only, smoke = args.only.split(","), args.smoke
    src = Path(args.cifar10)
    needs_data = any(k in only for k in ("labeler", "science", "stream", "unet"))
    data = src if src.is_dir() or not needs_data else part(
        "data", deadline, lambda: gpu_models.import_dataset(str(src), work / "cifar10"), smoke=smoke)
    labelers = None
    if data and "labeler" in only:
        later = sum(NEEDS[k] for k in ("train", "science", "stream", "generate", "hublabel", "unet") if k in only)
        labelers = part("labeler", deadline,
                        lambda: gpu_models.train_labelers(work, data, deadline, keep=later, smoke=smoke), smoke=smoke)
    if "train" in only:
        part("train", deadline, lambda: gpu_train.bench(smoke=smoke), smoke=smoke)
    if data and "science" in only:
        gap = part("science", deadline, lambda: gpu_train.science(
            data, work, out / "science.tar", left=lambda: deadline.left() - keep_after("science", only),
            smoke=smoke), smoke=smoke)
        print(gap or "")
    if data and "stream" in only:
        part("stream", deadline, lambda: stream_rates(data, smoke=smoke), smoke=smoke)
    if "generate" in only:
        gen_argv = ["--device", "cpu", "--count", "8", "--batch", "4", "--steps", "2"] if smoke else \
            ["--count", "5120", "--batch", "512", "--steps", "20"]
        part("generate", deadline, lambda: gpu_generate.main(gen_argv), smoke=smoke)
    if "hublabel" in only:
        rows = part("hublabel", deadline, lambda: gpu_labelers.main(["--smoke"] if smoke else []), smoke=smoke)
        log("hublabel rates", {"rows": rows})
    if data and "unet" in only:
        part("unet", deadline, lambda: gpu_models.train_small_generator(work, data, deadline, reserve=UNET_RESERVE,
                                                                        smoke=smoke), smoke=smoke)
    if "serve" in only:
        part("serve", deadline, lambda: serve_rates(smoke=smoke), smoke=smoke)
    gpu_models.pack_models(work, out / "models.tar", best_labeler(labelers))
    log("done", {"left_s": round(deadline.left()), "out": sorted(f.name for f in out.iterdir())})
    print(json.dumps({"card": card}))


if __name__ == "__main__":
    main()
