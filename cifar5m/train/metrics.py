"""What a run measures, when, and where it is written.

*Soft error* is the paper's main metric: ``mean(1 - p(true class))`` under the
model's softmax, a smooth version of the 0-1 error (Nakkiran et al. 2021, Sec. 2).
Log points follow the paper's code (``inftrain/train.py``): every 64 steps, and
denser early (every 4 steps below 1024, every 8 below 2048), because both worlds
move fastest at the start. Rows go to ``metrics.jsonl`` (appended, one flush per
row, so a killed run loses nothing written) and ``metrics.csv`` (rewritten whole,
atomically, at each row).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cifar5m.core.atomic import atomic_write_bytes
from cifar5m.train.config import PAPER_DENSE


def log_points(total_steps: int, *, every: int = 64,
               dense: tuple[tuple[int, int], ...] = PAPER_DENSE) -> list[int]:
    """Steps (SGD updates done) at which to evaluate: 0, the schedule, and the last step."""
    points = {0, total_steps}
    for step in range(1, total_steps):
        if step % every == 0 or any(step < below and step % stride == 0 for below, stride in dense):
            points.add(step)
    return sorted(points)


Reduce = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
             prepare: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 1000,
             autocast: Callable[[], object] | None = None,
             reduce: Reduce | None = None) -> dict[str, float]:
    """Soft error, hard error and cross-entropy of ``model`` on uint8 ``images``.

    ``prepare`` turns a uint8 batch into model input (float, normalised, layout).
    Sums are taken in float64 and passed through ``reduce`` (an all-reduce under DDP,
    where each rank holds a slice of the data), so the result is the mean over all.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=labels.device)
    for start in range(0, len(labels), batch_size):
        x = prepare(images[start : start + batch_size])
        y = labels[start : start + batch_size]
        if autocast is None:
            logits = model(x)
        else:
            with autocast():
                logits = model(x)
        logits = logits.float()
        p_true = F.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
        sums[0] += (1 - p_true).double().sum()
        sums[1] += (logits.argmax(1) != y).double().sum()
        sums[2] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[3] += len(y)
    if reduce is not None:
        sums = reduce(sums)
    model.train(was_training)
    count = max(float(sums[3]), 1.0)
    return {"soft_error": float(sums[0]) / count, "error": float(sums[1]) / count,
            "loss": float(sums[2]) / count}


class MetricsLog:
    """``metrics.jsonl`` + ``metrics.csv`` in a run directory; survives resume."""

    def __init__(self, directory: Path) -> None:
        self.jsonl = directory / "metrics.jsonl"
        self.csv = directory / "metrics.csv"
        self.rows: list[dict] = []

    def resume(self, step: int) -> None:
        """Keep the rows up to ``step`` (the checkpoint); later ones will be logged again."""
        rows = read_rows(self.jsonl) if self.jsonl.exists() else []
        self.rows = [r for r in rows if r["step"] <= step]
        atomic_write_bytes(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows).encode())
        self._write_csv()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        self._write_csv()

    def _write_csv(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_bytes(self.csv, buffer.getvalue().encode())


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (a torn last line from a kill is dropped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows
