"""Both worlds with one config, and the bootstrap gap between them.

``run_bootstrap`` trains ``real-seed{s}`` and ``ideal-seed{s}`` under ``out`` (each a
normal, resumable ``train`` run; a finished one is not trained again), then writes
``gap.csv`` and ``gap.md`` (test soft error of both worlds, their gap real - ideal,
and the real world's train soft error, at every log point, mean over seeds) and
``bootstrap.png``. The paper's claim: the gap stays small until the real world's train
error nears zero.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from shards.lock import DirectoryLock
from shards.manifest import atomic_write_bytes
from train.plots import curve, plot_bootstrap
from train.trainer import TrainConfig, train

GAP_COLUMNS = ("step", "ideal_test_soft_error", "real_test_soft_error", "gap",
               "real_train_soft_error", "ideal_test_error", "real_test_error", "error_gap",
               "real_train_error")


@dataclass(frozen=True)
class BootstrapConfig:
    """A run template (its ``world`` is ignored) and the seeds to repeat it with."""

    template: TrainConfig
    seeds: tuple[int, ...] = (0,)

    def to_json(self) -> str:
        return json.dumps({"template": self.template.saved(), "seeds": list(self.seeds)},
                          indent=2, sort_keys=True) + "\n"


@dataclass
class BootstrapResult:
    out: Path
    gap: list[dict]  # one row per common log point, GAP_COLUMNS
    plot: Path
    real: list[list[dict]]
    ideal: list[list[dict]]


def run_bootstrap(config: BootstrapConfig, *, out: str | Path, progress: bool = True) -> BootstrapResult:
    out = Path(out)
    # One bootstrap per directory. Under torchrun each run directory is locked by its
    # rank 0 (train.trainer), which refuses a second job at its first run.
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    with DirectoryLock(out, what="written by a bootstrap") if single else contextlib.nullcontext():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "bootstrap.json", config.to_json().encode())
        runs: dict[str, list[list[dict]]] = {"real": [], "ideal": []}
        for seed in config.seeds:
            for world in ("real", "ideal"):
                run = dataclasses.replace(config.template, world=world, seed=seed)
                result = train(run, out=out / f"{world}-seed{seed}", progress=progress)
                runs[world].append(result.rows)
        return write_report(runs["real"], runs["ideal"], out=out, title=_title(config))


def write_report(real: list[list[dict]], ideal: list[list[dict]], *, out: Path,
                 title: str = "") -> BootstrapResult:
    """Gap table (CSV + Markdown) and plot from finished runs' metric rows."""
    gap = gap_table(real, ideal)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=GAP_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(gap)
    atomic_write_bytes(out / "gap.csv", buffer.getvalue().encode())
    atomic_write_bytes(out / "gap.md", format_gap(gap).encode())
    plot = plot_bootstrap(real, ideal, out / "bootstrap.png", title=title)
    return BootstrapResult(out, gap, plot, real, ideal)


def gap_table(real: list[list[dict]], ideal: list[list[dict]]) -> list[dict]:
    """Mean over seeds at every step both worlds logged; gap = real - ideal test soft error."""
    columns = {}
    for world, runs in (("real", real), ("ideal", ideal)):
        for name in ("test_soft_error", "test_error", "train_soft_error", "train_error"):
            if runs and all(any(name in r for r in rows) for rows in runs):
                steps, mean, _, _ = curve(runs, name)
                columns[f"{world}_{name}"] = dict(zip(steps.tolist(), mean.tolist(), strict=True))
    common = sorted(set(columns["real_test_soft_error"]) & set(columns["ideal_test_soft_error"]))
    table = []
    for step in common:
        row = {"step": step}
        for name in GAP_COLUMNS[1:]:
            if name == "gap":
                row[name] = row["real_test_soft_error"] - row["ideal_test_soft_error"]
            elif name == "error_gap":
                both = row.get("real_test_error") is not None and row.get("ideal_test_error") is not None
                row[name] = row["real_test_error"] - row["ideal_test_error"] if both else None
            elif name in columns:
                row[name] = columns[name].get(step)
        table.append(row)
    return table


def format_gap(gap: list[dict], *, every: int = 1) -> str:
    """A Markdown table of the gap (every ``every``-th row, and always the last)."""
    head = ("| step | ideal test soft err | real test soft err | gap (real - ideal) | "
            "real train soft err | ideal test err | real test err | err gap | real train err |")
    lines = [head, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, row in enumerate(gap):
        if i % every and i != len(gap) - 1:
            continue
        lines.append(f"| {row['step']} | " + " | ".join(_cell(row, c) for c in GAP_COLUMNS[1:]) + " |")
    if gap:
        last = gap[-1]
        lines.append(f"\nEnd (step {last['step']}): gap {last['gap']:+.4f} "
                     f"(real {last['real_test_soft_error']:.4f}, ideal {last['ideal_test_soft_error']:.4f})"
                     + (f"; test error gap {last['error_gap']:+.4f}." if last.get("error_gap") is not None
                        else "."))
    return "\n".join(lines) + "\n"


def _cell(row: dict, column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    return f"{value:+.4f}" if column.endswith("gap") else f"{value:.4f}"


def _title(config: BootstrapConfig) -> str:
    t = config.template
    return (f"{t.arch}, real N={t.n} vs ideal, T={t.steps}, batch {t.batch_size}, "
            f"lr {t.lr}, aug {t.augment}")
