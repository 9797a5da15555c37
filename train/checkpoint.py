"""Checkpoints that let a killed run resume onto the same curve.

One file, ``checkpoint.pt``, written atomically (temp + rename), holding the
model, optimizer, LR schedule, step, and per rank the loader state and every RNG
(Python, NumPy, torch CPU and CUDA, the augmentation generator). It is loaded
with ``weights_only=False`` because RNG states are tuples and arrays: only load
checkpoints you wrote.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from shards.atomic import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, state: dict) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(directory) / CHECKPOINT_NAME
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_checkpoint(directory: Path) -> dict | None:
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
