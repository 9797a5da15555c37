"""What the labeler and generator trainers share: checkpoints (atomic, settings-checked), the
autocast of a ``--precision`` and the atomic swap of a finished model directory into place."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import torch

from cifar5m.errors import ConfigMismatchError
from shards.atomic import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(work_dir: Path, state: dict[str, Any]) -> None:
    """Write ``work_dir/checkpoint.pt`` atomically (a kill mid-save keeps the previous one)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(work_dir / CHECKPOINT_NAME, buf.getvalue())


def load_checkpoint(work_dir: Path, *, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state on the CPU, None when there is none; a run with other settings is refused.

    ``load_state_dict`` moves weights and optimizer state to the model's device; RNG states
    must stay on the CPU, so nothing is mapped to the training device here.
    """
    path = work_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["fingerprint"] != fingerprint:
        raise ConfigMismatchError(f"{path} is a checkpoint of a run with other settings; "
                                  f"use another --out/--work or delete {work_dir}")
    return state


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
