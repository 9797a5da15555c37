"""Checkpoints that let a killed training run resume onto the same curve; used by the trainer
(``train``) and by the labeler and UNet trainers (``generator``).

One file, ``checkpoint.pt``, written atomically (temp + rename: a kill mid-save keeps the
previous one). It is loaded with ``weights_only=False`` because RNG states are tuples and
arrays: only load checkpoints you wrote. Nothing is mapped to the training device on load:
``load_state_dict`` moves weights and optimizer state to the model's device, and RNG states
must stay on the CPU.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar5m.core.atomic import atomic_write_bytes
from cifar5m.core.errors import ConfigMismatchError

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict:
    """Every RNG a step draws from: Python, NumPy, torch CPU and (when present) CUDA."""
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


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``directory/checkpoint.pt`` atomically (the directory is created if needed)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(directory) / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_checkpoint(directory: str | Path, *, fingerprint: dict[str, Any] | None = None,
                    ) -> dict[str, Any] | None:
    """The saved state on the CPU, None when there is none.

    With ``fingerprint``, a checkpoint whose ``state["fingerprint"]`` differs (a run with other
    settings) is refused.
    """
    path = Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if fingerprint is not None and state["fingerprint"] != fingerprint:
        raise ConfigMismatchError(f"{path} is a checkpoint of a run with other settings; "
                                  f"use another --out/--work or delete {directory}")
    return state
