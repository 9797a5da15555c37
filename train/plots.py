"""The Deep Bootstrap plot (the paper's Figure 1): soft error against SGD steps.

Solid lines: test soft error of the ideal world and of the real world; dashed: train
soft error of the real world on its N samples. A second panel shows the same in hard
(0-1) error. With several seeds the line is the
mean and the band spans min to max. The x axis is logarithmic by default because
the log points are dense early (the paper's plots use linear steps; ``log_x=False``).
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from shards.manifest import atomic_write_bytes

Curve = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # steps, mean, lo, hi


def curve(runs: list[list[dict]], column: str) -> Curve:
    """Mean/min/max of ``column`` over seeds, at the steps every seed logged."""
    steps = sorted(set.intersection(*[{r["step"] for r in rows if column in r} for rows in runs]))
    firsts = []  # per run, the first row logged at each step (a resumed log may repeat a step)
    for rows in runs:
        first: dict[int, dict] = {}
        for r in rows:
            first.setdefault(r["step"], r)
        firsts.append(first)
    values = np.array([[first[s][column] for s in steps] for first in firsts], dtype=float)
    return np.array(steps), values.mean(0), values.min(0), values.max(0)


def plot_bootstrap(real: list[list[dict]], ideal: list[list[dict]], path: str | Path, *,
                   title: str = "", log_x: bool | None = None) -> Path:
    """Write the comparison PNG; ``real``/``ideal`` are metric rows per seed.

    Left: soft error (the paper's Figure 1). Right: the same curves in hard (0-1) error,
    because soft error also rewards confidence: a memorising real-world model can have
    the lower test soft error while its test error is higher.
    """
    if log_x is None:  # the paper's 39,000 steps with dense early points read best on a log axis
        log_x = max((r["step"] for rows in real + ideal for r in rows), default=0) >= 2000
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100)
    for ax, metric, name in ((axes[0], "soft_error", "soft error  (mean 1 - p(true class))"),
                             (axes[1], "error", "error  (0-1)")):
        _panel(ax, real, ideal, metric, log_x=log_x)
        ax.set_ylabel(name)
    n_seeds = max(len(real), len(ideal))
    fig.suptitle(title + (f"  ({n_seeds} seeds: mean, band = min..max)" if n_seeds > 1 else ""),
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
    return path


def _panel(ax, real: list[list[dict]], ideal: list[list[dict]], metric: str, *, log_x: bool) -> None:
    lines = [(ideal, f"test_{metric}", "Ideal world: test", "tab:blue", "-"),
             (real, f"test_{metric}", "Real world: test", "tab:red", "-"),
             (real, f"train_{metric}", "Real world: train", "tab:red", "--")]
    for runs, column, label, color, style in lines:
        if not runs or not all(any(column in r for r in rows) for rows in runs):
            continue
        steps, mean, lo, hi = curve(runs, column)
        x = np.maximum(steps, 1) if log_x else steps  # step 0 drawn at 1 on a log axis
        ax.plot(x, mean, style, color=color, label=label, lw=1.6)
        if len(runs) > 1:
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("SGD steps")
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
