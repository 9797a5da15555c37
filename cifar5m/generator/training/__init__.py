"""What the labeler and generator trainers share: the autocast of a ``--precision`` and the atomic
swap of a finished model directory into place (their checkpoints: ``cifar5m.core.checkpoint``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def training_autocast(device: torch.device, precision: str) -> torch.autocast:
    """Autocast for ``--precision`` auto|fp32|bf16|fp16 (auto: bf16 on CUDA, fp32 elsewhere)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def replace_dir(tmp: Path, dest: Path) -> Path:
    """Move the finished directory ``tmp`` to ``dest``, replacing any old one.

    The old directory is renamed aside before ``tmp`` is renamed in, so a reader sees the
    old directory or the new one, never half of one.
    """
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest
