"""`cifar5m train` checks data, N, the ideal world's budget and the device before it writes
anything, and a run directory without a checkpoint or metrics takes new settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cifar5m.cli.main import cli

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from cifar5m.shards.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("d") / "ds")


def args(data: Path | str, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--world", "real", "--n", "50", "--arch", "mlp",
            "--width", "8", "--steps", "2", "--batch-size", "16", "--log-every", "2",
            "--log-dense", "none", "--out", str(out), *extra]


@pytest.mark.parametrize(("change", "says"), [
    ({"--data": "/no/such/dataset"}, "/no/such/dataset"),
    ({"--n": "100000"}, "100000"),
    ({"--world": "ideal", "--steps": "99"}, "fresh samples"),
    ({"--device": "nonsense"}, "--device 'nonsense'"),
    ({"--test-split": "validation"}, "validation"),
])
def test_a_bad_flag_fails_in_one_line_before_the_run_directory_exists(data, tmp_path, change, says):
    out = tmp_path / "run1"
    argv = args(data, out)
    for flag, value in change.items():
        argv += [flag, value] if flag not in argv else []
        argv[argv.index(flag) + 1] = value
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 1, res.output
    assert res.output.startswith("Error: ") and len(res.output.strip().splitlines()) == 1, res.output
    assert says in res.output
    assert not out.exists()
    fixed = CliRunner().invoke(cli, args(data, out))  # the corrected command just works
    assert fixed.exit_code == 0, fixed.output
    assert "finished: step 2" in fixed.output


def test_a_run_dir_without_checkpoint_or_metrics_is_reused_with_new_settings(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # What a run killed before its first metrics row leaves: its config and an empty log.
    stale = {"data": str(data), "world": "real", "n": 50, "lr": 0.5}
    (out / "config.json").write_text(json.dumps(stale))
    (out / "metrics.jsonl").write_text("")
    res = CliRunner().invoke(cli, args(data, out, "--lr", "0.05"))
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["lr"] == 0.05
    # Once it has metrics and a checkpoint, other settings are refused (nothing is touched).
    stamp = (out / "checkpoint.pt").stat().st_mtime_ns
    res = CliRunner().invoke(cli, args(data, out, "--lr", "0.2"))
    assert res.exit_code == 1 and "other settings" in res.output and "'lr': (0.05, 0.2)" in res.output
    assert (out / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert json.loads((out / "config.json").read_text())["lr"] == 0.05
