"""GPU training of the labeler and the builtin generator, paced by a deadline.

Used by ``gpu_check.py`` (one prepared script for a 15-minute lease); each function
prints one JSON line per result and appends it to ``$OUT/results.jsonl``.

* ``train_labelers``: a sweep in priority order: airbench94 widths (64,256,256) and a
  wider net for longer than airbench94's 10 epochs, and the builtin candidate (<= 5 MB
  of fp32 weights). A run starts only if the deadline leaves room for it.
  Goal: >= 91 % on the JPEG copy's test split in < 60 s of training.
* ``train_small_generator``: the builtin UNet architecture (~1.5M parameters, cheap on
  CPU) trained until the deadline, then saved with ``save_pretrained`` (EMA weights).
* ``pack_models``: the chosen labeler and the UNet as one tar for the trip back.

Installing them is done by hand on the developer machine (``tar -x`` into
``generator/builtin/`` and update the model cards from results.jsonl).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Builtin generator architecture (as shipped; ~1.5M params, 0.43 GFLOP per image-step).
GEN_ARCH = dict(block_out_channels=(24, 48, 96), layers_per_block=1, attention_levels=(2,), norm_num_groups=8,
                dropout=0.0)
# (name, widths, epochs, seconds it may need on an H200 incl. data load and eval); priority order.
LABELER_RUNS = [
    # 2026-11-28 on an H200 (JPEG copy): (64,256,256) 10 ep 89.70 % in 3.2 s, 20 ep 90.56 % in
    # 7.3 s; (64,128,256) 20 ep 89.84 % in 5.1 s. Hence longer and wider runs for >= 91 %.
    ("airbench94-e40", (64, 256, 256), 40, 35),
    ("wide-e30", (128, 384, 384), 30, 50),
    ("builtin-e40", (64, 128, 256), 40, 30),  # 1.16M params = 4.6 MB fp32: the builtin candidate
    ("wide-e50", (128, 384, 384), 50, 70),
]


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


RESULTS = Path(os.environ.get("OUT", ".")) / "results.jsonl"  # gpu_check points it at $OUT


def log(name: str, record: dict) -> None:
    line = json.dumps({"step": name, **record}, default=str)
    print(line, flush=True)
    with open(RESULTS, "a") as f:
        f.write(line + "\n")


def import_dataset(src: str, dest: Path) -> Path:
    """``cifar5m import`` as npy (a no-op when ``dest`` is already a finished dataset)."""
    if not (dest / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "cifar5m", "import", src, "--out", str(dest),
                        "--image-format", "npy", "--workers", str(min(8, os.cpu_count() or 1))],
                       check=True, cwd=ROOT)
    return dest


def train_labelers(work: Path, data: Path, deadline: Deadline, *, keep: float = 0.0,
                   smoke: bool = False) -> dict[str, dict]:
    """The sweep; a run starts only if it leaves ``keep`` seconds for the parts after it."""
    from cifar5m.generator.training.labeler_recipe import LabelerTrainConfig, train_labeler

    results: dict[str, dict] = {}
    for name, widths, epochs, need in LABELER_RUNS:
        if not smoke and deadline.left() - need < keep:
            log(f"labeler {name}", {"skipped": f"{deadline.left():.0f} s left, needs ~{need} + {keep:.0f} later"})
            continue
        cfg = LabelerTrainConfig(data=str(data), out=str(work / f"labeler-{name}"), widths=widths,
                                 epochs=1 if smoke else epochs, batch_size=256 if smoke else 1024,
                                 max_train=1024 if smoke else None, max_test=256 if smoke else None,
                                 precision="bf16" if not smoke else "fp32", checkpoint_every=10**6,
                                 work=str(work / f"ckpt-labeler-{name}"))
        t0 = time.perf_counter()
        metrics = train_labeler(cfg, device="cpu" if smoke else "cuda", progress=False)
        metrics.pop("history", None)
        metrics.update(name=name, widths=list(widths), wall_seconds=round(time.perf_counter() - t0, 1))
        log(f"labeler {name}", metrics)
        results[name] = metrics
    return results


def train_small_generator(work: Path, data: Path, deadline: Deadline, *, reserve: float,
                          smoke: bool = False) -> dict:
    """Train the builtin-size UNet in chunks until ``reserve`` seconds before the deadline."""
    from cifar5m.generator.training.unet import UNetTrainConfig, train_generator

    def cfg(steps: int) -> UNetTrainConfig:
        return UNetTrainConfig(data=str(data), out=str(work / "unet"), **GEN_ARCH, lr=8e-4,
                               batch_size=32 if smoke else 512, warmup_steps=10 if smoke else 500,
                               ema_decay=0.9995, ema_warmup=True, steps=steps,
                               max_train=512 if smoke else None, checkpoint_every=10**6,
                               sample_every=0, sample_count=16 if smoke else 64,
                               sample_steps=4 if smoke else 50,
                               precision="fp32" if smoke else "bf16", work=str(work / "ckpt-unet"))

    device = "cpu" if smoke else "cuda"
    t0, step, chunk = time.perf_counter(), 0, 2 if smoke else 300
    rates = []
    while deadline.left() > reserve and (not smoke or step < 4):
        c0 = time.perf_counter()
        step += chunk
        train_generator(cfg(10**9), device=device, stop_after=step, progress=False)
        rates.append(chunk / (time.perf_counter() - c0))
        if not smoke:  # size the next chunk to ~90 % of the time left (each call reloads data: ~2 s)
            chunk = int(min(20_000, max(100, 0.9 * rates[-1] * (deadline.left() - reserve - 3))))
    metrics = train_generator(cfg(max(step, 1)), device=device, progress=False)
    metrics.update(wall_seconds=round(time.perf_counter() - t0, 1),
                   steps_per_s_per_chunk=[round(r, 1) for r in rates[:3]] + ["..."] + [round(r, 1) for r in rates[-2:]])
    log("generator", metrics)
    return metrics


def pack_models(work: Path, dest: Path, labeler_name: str | None) -> Path:
    """``models.tar``: ``labeler/`` (the chosen run) and ``unet/``, for generator/builtin."""
    with tarfile.open(dest, "w") as tar:
        if labeler_name and (work / f"labeler-{labeler_name}").is_dir():
            tar.add(work / f"labeler-{labeler_name}", arcname="labeler")
        if (work / "unet").is_dir():
            tar.add(work / "unet", arcname="unet")
    return dest
