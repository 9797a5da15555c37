"""`cifar5m bootstrap`: both worlds, several seeds, the gap table and the plot."""

from __future__ import annotations

import csv

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cifar5m.cli import cli
from train.bootstrap import BootstrapConfig, format_gap, gap_table, run_bootstrap, write_report
from train.trainer import TrainConfig

torch.set_num_threads(1)


def rows(world: str, values: list[float], train: list[float] | None = None) -> list[dict]:
    out = []
    for i, v in enumerate(values):
        row = {"step": 10 * i, "test_soft_error": v, "test_error": v / 2}
        if train is not None:
            row["train_soft_error"] = train[i]
        out.append(row)
    return out


def test_gap_is_real_minus_ideal_averaged_over_seeds():
    real = [rows("real", [0.9, 0.5, 0.4], [0.9, 0.4, 0.1]), rows("real", [0.9, 0.7, 0.6], [0.9, 0.6, 0.3])]
    ideal = [rows("ideal", [0.9, 0.5, 0.3]), rows("ideal", [0.9, 0.5, 0.3])]
    table = gap_table(real, ideal)
    assert [r["step"] for r in table] == [0, 10, 20]
    assert table[2]["real_test_soft_error"] == pytest.approx(0.5)
    assert table[2]["gap"] == pytest.approx(0.2)
    assert table[1]["real_train_soft_error"] == pytest.approx(0.5)
    text = format_gap(table)
    assert "| 20 | 0.3000 | 0.5000 | +0.2000 | 0.2000 | 0.1500 | 0.2500 | +0.1000 |  |" in text
    assert "End (step 20): gap +0.2000" in text and "test error gap +0.1000" in text


def test_report_plot_holds_both_worlds(tmp_path):
    real = [rows("real", [0.9, 0.5, 0.4], [0.9, 0.4, 0.1])]
    ideal = [rows("ideal", [0.9, 0.5, 0.3])]
    result = write_report(real, ideal, out=tmp_path, title="test")
    with Image.open(result.plot) as im:
        assert im.format == "PNG" and im.size == (1000, 420)
        pixels = im.convert("RGB").getcolors(1 << 20)
    colors = {c for _, c in pixels}
    assert (31, 119, 180) in colors and (214, 39, 40) in colors  # tab:blue ideal, tab:red real
    with open(tmp_path / "gap.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[-1]["gap"]) == pytest.approx(0.1)
    assert float(table[-1]["ideal_test_soft_error"]) == pytest.approx(0.3)


def test_run_bootstrap_trains_both_worlds_for_every_seed(make_dataset, tmp_path):
    data = make_dataset()
    template = TrainConfig(data=str(data), world="real", n=50, arch="mlp", width=8, steps=4,
                           batch_size=16, log_every=2, log_dense=())
    result = run_bootstrap(BootstrapConfig(template, seeds=(0, 1)), out=tmp_path, progress=False)
    for name in ("real-seed0", "ideal-seed0", "real-seed1", "ideal-seed1"):
        assert (tmp_path / name / "result.json").exists()
    assert len(result.real) == len(result.ideal) == 2
    assert [r["step"] for r in result.gap] == [0, 2, 4]
    last = result.gap[-1]
    assert last["gap"] == pytest.approx(last["real_test_soft_error"] - last["ideal_test_soft_error"])
    assert last["real_train_soft_error"] is not None
    assert (tmp_path / "gap.md").read_text().startswith("| step | ideal test soft err")
    assert result.plot.stat().st_size > 10_000


def test_cli_bootstrap(make_dataset, tmp_path):
    data = make_dataset()
    args = ["bootstrap", "--data", str(data), "--n", "50", "--arch", "mlp", "--width", "8",
            "--steps", "4", "--batch-size", "16", "--log-every", "2", "--log-dense", "none",
            "--out", str(tmp_path)]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    assert "End (step 4): gap" in done.output and (tmp_path / "bootstrap.png").exists()
    no_n = CliRunner().invoke(cli, [a for a in args if a not in ("--n", "50")])
    assert no_n.exit_code == 2 and "needs --n" in no_n.output
