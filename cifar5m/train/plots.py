"""The Deep Bootstrap figure in the paper's layout (its Figure 1, one panel per model).

Per model (a column): test soft error against SGD steps of the ideal world (black) and of
the real world at every N (one colour each); dashed, the real worlds' train soft error on
their N samples; a dot where each real world converges (train soft error below the
stated threshold, mean step over the seeds that did). A second row shows the same in
0-1 error, because soft error also rewards confidence. With several seeds the line is the
mean and the band spans min to max. The x axis is logarithmic for long runs (the log
points are dense early; ``log_x=False`` for linear steps as in the paper).
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cifar5m.core.atomic import atomic_write_bytes

Curve = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # steps, mean, lo, hi
IDEAL_COLOR = "black"
METRICS = (("soft_error", "soft error  (mean 1 - p(true class))"), ("error", "error  (0-1)"))


def by_step(rows: list[dict]) -> dict[int, dict]:
    """First row at each step (a resumed log may repeat a step)."""
    first: dict[int, dict] = {}
    for r in rows:
        first.setdefault(r["step"], r)
    return first


def curve(runs: list[list[dict]], column: str) -> Curve:
    """Mean/min/max of ``column`` over seeds, at the steps every seed logged."""
    steps = sorted(set.intersection(*[{r["step"] for r in rows if column in r} for rows in runs]))
    firsts = [by_step(rows) for rows in runs]
    values = np.array([[first[s][column] for s in steps] for first in firsts], dtype=float)
    if not steps:
        return np.array([]), np.array([]), np.array([]), np.array([])
    return np.array(steps), values.mean(0), values.min(0), values.max(0)


def n_colors(ns: list[int]) -> dict[int, tuple]:
    cmap = plt.get_cmap("viridis")
    return {n: cmap(0.85 * i / max(1, len(ns) - 1)) for i, n in enumerate(sorted(ns))}


def plot_sweep(panels: dict[str, dict], path: str | Path, *, markers: dict[tuple[str, int], float],
               threshold: float, title: str = "", log_x: bool | None = None) -> Path:
    """Write the figure; ``panels[model] = {"ideal": [rows per seed], "real": {N: [rows per seed]}}``.

    ``markers[(model, N)]`` is the step where that real world converged. The title and a
    description of the panels are also stored as PNG text chunks ("Title", "Description").
    """
    all_rows = [rows for p in panels.values() for runs in [p["ideal"], *p["real"].values()] for rows in runs]
    if log_x is None:  # the paper's 39,000 steps with dense early points read best on a log axis
        log_x = max((r["step"] for rows in all_rows for r in rows), default=0) >= 2000
    seeds = max(len(p["ideal"]) for p in panels.values())
    width = max(8.0, 4.6 * len(panels) + 0.6)
    fig, axes = plt.subplots(2, len(panels), figsize=(width, 7.6), dpi=100, squeeze=False,
                             layout="constrained")
    for col, (model, panel) in enumerate(panels.items()):
        for row, (metric, label) in enumerate(METRICS):
            ax = axes[row][col]
            _panel(ax, panel, metric, markers={n: s for (m, n), s in markers.items() if m == model},
                   log_x=log_x)
            ax.set_title(f"{model}: {metric.replace('_', ' ')}", fontsize=10)
            if col == 0:
                ax.set_ylabel(label)
    note = (f"solid: test, dashed: real world train; dot: real world converged "
            f"(train soft error < {threshold:g})")
    if seeds > 1:
        note += f"; {seeds} seeds: mean, band = min..max"
    lines = [*title.splitlines(), note] if title else [note]
    fig.suptitle("\n".join(textwrap.fill(line, int(width * 15)) for line in lines), fontsize=9)
    path = Path(path)
    png = io.BytesIO()
    fig.savefig(png, format="png", metadata={"Title": title, "Description": note})
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
    return path


def _panel(ax, panel: dict, metric: str, *, markers: dict[int, float], log_x: bool) -> None:
    colors = n_colors(list(panel["real"]))
    lines = [(panel["ideal"], f"test_{metric}", "ideal world", IDEAL_COLOR, "-", None)]
    for n, runs in sorted(panel["real"].items()):
        lines.append((runs, f"test_{metric}", f"real N={n:,}", colors[n], "-", markers.get(n)))
        lines.append((runs, f"train_{metric}", None, colors[n], "--", None))
    for runs, column, label, color, style, marker in lines:
        if not runs or not all(any(column in r for r in rows) for rows in runs):
            continue
        steps, mean, lo, hi = curve(runs, column)
        if not len(steps):
            continue
        x = np.maximum(steps, 1) if log_x else steps  # step 0 drawn at 1 on a log axis
        ax.plot(x, mean, style, color=color, label=label, lw=1.5 if style == "-" else 1.1)
        if len(runs) > 1:
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
        if marker is not None:  # on the test curve, at the logged step nearest the mean step
            i = int(np.argmin(np.abs(steps - marker)))
            ax.plot(x[i], mean[i], "o", color=color, ms=7, mec="white", mew=1.2, zorder=5)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("SGD steps")
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
