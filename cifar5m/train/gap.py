"""The bootstrap gap of a sweep: when each real world converges, and real minus ideal there and at T.

Per model and N, for every seed: the *convergence step* is the first log point where the
real world's train soft error is below the threshold; the *gap* is the real world's test
soft error minus the ideal world's (same model, same seed) at that step and at the last
step T. The table gives the mean over seeds and the spread (sample standard deviation).
``curves.csv`` holds every run's metric rows, long form, for re-plotting.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from cifar5m.core.atomic import atomic_write_bytes
from cifar5m.train.config import BootstrapConfig, run_name
from cifar5m.train.plots import by_step, plot_sweep

GAP_COLUMNS = ("model", "n", "seeds", "converged", "conv_step", "conv_step_min", "conv_step_max",
               "real_test_soft_error_conv", "ideal_test_soft_error_conv", "gap_conv", "gap_conv_sd",
               "steps", "real_test_soft_error_T", "ideal_test_soft_error_T", "gap_T", "gap_T_sd",
               "real_train_soft_error_T", "error_gap_T", "error_gap_T_sd")
CURVE_COLUMNS = ("model", "world", "n", "seed", "step", "lr", "test_soft_error", "test_error",
                 "test_loss", "train_soft_error", "train_error", "train_loss",
                 "cifar10_test_soft_error", "cifar10_test_error")


@dataclass
class Report:
    gap: list[dict]  # one row per model and N, GAP_COLUMNS
    plot: Path
    curves: dict[str, list[dict]]  # run directory -> its metric rows


def converged_at(rows: list[dict], threshold: float) -> int | None:
    """First step where the train soft error is below ``threshold`` (None: never)."""
    return next((r["step"] for r in rows if r.get("train_soft_error", 1.0) < threshold), None)


def _at(rows: dict[int, dict], step: int, column: str) -> float | None:
    """``column`` at the last logged step <= ``step``."""
    logged = [s for s in rows if s <= step and column in rows[s]]
    return rows[max(logged)][column] if logged else None


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _sd(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def gap_row(arch: str, n: int, pairs: list[tuple[list[dict], list[dict]]], threshold: float) -> dict:
    """The table row of one model and N from its (real rows, ideal rows) per seed."""
    conv, at_conv, at_end = [], [], []
    for real, ideal in pairs:
        r, i = by_step(real), by_step(ideal)
        step = converged_at(real, threshold)
        conv.append(step)
        if step is not None:
            rt, it = _at(r, step, "test_soft_error"), _at(i, step, "test_soft_error")
            at_conv.append((rt, it, rt - it))
        end = max(set(r) & set(i), default=None)
        if end is not None:
            at_end.append((end, r[end]["test_soft_error"], i[end]["test_soft_error"],
                           r[end].get("train_soft_error"),
                           r[end]["test_error"] - i[end]["test_error"]))
    steps = [s for s in conv if s is not None]
    return {
        "model": arch, "n": n, "seeds": len(pairs), "converged": len(steps),
        "conv_step": _mean(steps), "conv_step_min": min(steps, default=None),
        "conv_step_max": max(steps, default=None),
        "real_test_soft_error_conv": _mean([c[0] for c in at_conv]),
        "ideal_test_soft_error_conv": _mean([c[1] for c in at_conv]),
        "gap_conv": _mean([c[2] for c in at_conv]), "gap_conv_sd": _sd([c[2] for c in at_conv]),
        "steps": min((e[0] for e in at_end), default=None),
        "real_test_soft_error_T": _mean([e[1] for e in at_end]),
        "ideal_test_soft_error_T": _mean([e[2] for e in at_end]),
        "gap_T": _mean([e[1] - e[2] for e in at_end]), "gap_T_sd": _sd([e[1] - e[2] for e in at_end]),
        "real_train_soft_error_T": _mean([e[3] for e in at_end]),
        "error_gap_T": _mean([e[4] for e in at_end]), "error_gap_T_sd": _sd([e[4] for e in at_end]),
    }


def gap_rows(config: BootstrapConfig, curves: dict[str, list[dict]]) -> list[dict]:
    table = []
    for arch in config.archs:
        for n in config.ns:
            pairs = [(curves[run_name(arch, s, n)], curves[run_name(arch, s)]) for s in config.seeds]
            table.append(gap_row(arch, n, pairs, config.threshold))
    return table


def format_gap(table: list[dict], *, threshold: float) -> str:
    """The Markdown table: mean over seeds, ± the standard deviation where seeds > 1."""
    lines = [f"Bootstrap gap = real - ideal test soft error; conv = first step with real train "
             f"soft error < {threshold:g} (mean over the seeds that converged).\n",
             "| model | N | conv step | converged | real test soft err @conv | gap @conv | "
             "real test soft err @T | ideal test soft err @T | gap @T | real train soft err @T | "
             "0-1 err gap @T |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        cells = [r["model"], f"{r['n']:,}", _num(r["conv_step"], "{:,.0f}"),
                 f"{r['converged']}/{r['seeds']}", _num(r["real_test_soft_error_conv"]),
                 _pm(r["gap_conv"], r["gap_conv_sd"]), _num(r["real_test_soft_error_T"]),
                 _num(r["ideal_test_soft_error_T"]), _pm(r["gap_T"], r["gap_T_sd"]),
                 _num(r["real_train_soft_error_T"]), _pm(r["error_gap_T"], r["error_gap_T_sd"])]
        lines.append("| " + " | ".join(cells) + " |")
    steps = {r["steps"] for r in table if r["steps"] is not None}
    if steps:
        lines.append(f"\nT = {', '.join(f'{s:,}' for s in sorted(steps))} steps.")
    return "\n".join(lines) + "\n"


def _num(value: float | None, fmt: str = "{:.4f}") -> str:
    return "" if value is None else fmt.format(value)


def _pm(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:+.4f}" + (f" ± {sd:.4f}" if sd is not None else "")


def _csv(rows: list[dict], columns: tuple[str, ...]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def curve_rows(config: BootstrapConfig, curves: dict[str, list[dict]]) -> list[dict]:
    out = []
    for arch in config.archs:
        for seed in config.seeds:
            for n in (None, *config.ns):
                out += [{"model": arch, "world": "ideal" if n is None else "real", "n": n or "",
                         "seed": seed, **row} for row in by_step(curves[run_name(arch, seed, n)]).values()]
    return out


def write_report(config: BootstrapConfig, curves: dict[str, list[dict]], *, out: Path,
                 wrapped: bool = False, pool: int | None = None) -> Report:
    """``gap.csv``, ``gap.md``, ``curves.csv`` and ``bootstrap.png`` under ``out``."""
    table = gap_rows(config, curves)
    atomic_write_bytes(out / "gap.csv", _csv(table, GAP_COLUMNS))
    atomic_write_bytes(out / "gap.md", format_gap(table, threshold=config.threshold).encode())
    atomic_write_bytes(out / "curves.csv", _csv(curve_rows(config, curves), CURVE_COLUMNS))
    panels = {arch: {"ideal": [curves[run_name(arch, s)] for s in config.seeds],
                     "real": {n: [curves[run_name(arch, s, n)] for s in config.seeds] for n in config.ns}}
              for arch in config.archs}
    markers = {(r["model"], r["n"]): r["conv_step"] for r in table if r["conv_step"] is not None}
    plot = plot_sweep(panels, out / "bootstrap.png", markers=markers, threshold=config.threshold,
                      title=sweep_title(config, wrapped=wrapped, pool=pool))
    return Report(table, plot, curves)


def sweep_title(config: BootstrapConfig, *, wrapped: bool, pool: int | None = None) -> str:
    """The figure's title: every setting that shapes the curves, and what the worlds are."""
    t = config.template
    lr = f"lr {t.lr:g} {t.schedule}" + (f" stepped every {t.lr_step_every}" if t.schedule == "cosine"
                                         and t.lr_step_every > 1 else "")
    precision = t.precision if t.precision != "auto" else (
        "bf16" if t.device.startswith("cuda") or (t.device == "auto" and torch.cuda.is_available())
        else "fp32")
    extra = [f"momentum {t.momentum:g}"] if t.momentum else []
    extra += [f"wd {t.weight_decay:g}"] if t.weight_decay else []
    title = (f"Deep Bootstrap on {Path(t.data).name}: T={t.steps:,} steps, batch {t.batch_size}, "
             + ", ".join([lr, *extra, f"aug {t.augment}", precision]))
    fresh = t.steps * t.batch_size
    title += (f"\nideal world: {fresh:,} fresh samples, each seen once"
              + (f", from a pool of {pool:,}" if pool else "")
              + f"; real worlds: N = {', '.join(f'{n:,}' for n in config.ns)} samples, each reused "
              + ", ".join(f"~{fresh / n:.0f}x" for n in config.ns))
    if wrapped:
        title += "\nIDEAL WORLD WRAPPED (--wrap): past one pass over the data its samples repeat"
    return title
