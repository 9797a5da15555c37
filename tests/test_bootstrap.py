"""`cifar5m bootstrap`: the sweep over N, models and seeds, its budgets, gap table and figure."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cifar5m.cli.main import cli
from cifar5m.cli.train import split_archs
from cifar5m.core.errors import NotEnoughSamplesError
from cifar5m.train.bootstrap import run_bootstrap
from cifar5m.train.config import BootstrapConfig, TrainConfig
from cifar5m.train.gap import converged_at, format_gap, gap_row
from cifar5m.train.trainer import Learner

torch.set_num_threads(1)
TINY = dict(steps=4, batch_size=16, log_every=2, log_dense=(), test_limit=32)


@pytest.fixture
def built(monkeypatch) -> list[tuple]:
    """(arch, world, n, seed) of every run that trains (builds a model); reused runs do not."""
    calls: list[tuple] = []
    original = Learner.build.__func__

    def build(cls, config, rt):
        calls.append((config.arch, config.world, config.n, config.seed))
        return original(cls, config, rt)

    monkeypatch.setattr(Learner, "build", classmethod(build))
    return calls


def rows(test: list[float], train: list[float] | None = None, *, every: int = 10) -> list[dict]:
    out = []
    for i, v in enumerate(test):
        row = {"step": every * i, "test_soft_error": v, "test_error": v / 2}
        if train is not None:
            row["train_soft_error"] = train[i]
        out.append(row)
    return out


def test_gap_at_convergence_and_at_T_with_seed_spread():
    ideal = rows([0.9, 0.5, 0.4, 0.3])
    real0 = rows([0.9, 0.6, 0.5, 0.5], [0.9, 0.3, 0.005, 0.001])  # converges at step 20
    real1 = rows([0.9, 0.6, 0.6, 0.45], [0.9, 0.2, 0.05, 0.002])  # converges at step 30
    assert converged_at(real0, 0.01) == 20 and converged_at(real1, 0.01) == 30
    assert converged_at(real1, 0.001) is None
    row = gap_row("mlp", 500, [(real0, ideal), (real1, ideal)], 0.01)
    assert row["converged"] == 2 and row["conv_step"] == 25
    assert (row["conv_step_min"], row["conv_step_max"]) == (20, 30)
    assert row["gap_conv"] == pytest.approx(((0.5 - 0.4) + (0.45 - 0.3)) / 2)
    assert row["gap_T"] == pytest.approx(((0.5 - 0.3) + (0.45 - 0.3)) / 2)
    assert row["gap_T_sd"] == pytest.approx(0.035355, abs=1e-5)  # sd of 0.20 and 0.15
    assert row["steps"] == 30 and row["real_train_soft_error_T"] == pytest.approx(0.0015)
    never = gap_row("mlp", 500, [(real1, ideal)], 0.001)
    assert never["converged"] == 0 and never["conv_step"] is None and never["gap_conv"] is None
    text = format_gap([row, never], threshold=0.01)
    assert "| mlp | 500 | 25 | 2/2 | 0.4750 | +0.1250 ± 0.0354 |" in text
    assert "| mlp | 500 |  | 0/1 |" in text and "soft error < 0.01" in text


def test_sweep_trains_ideal_once_per_model_and_seed_and_adding_an_n_trains_only_it(
        make_dataset, tmp_path, built):
    data = make_dataset()
    template = TrainConfig(data=str(data), width=2, **TINY)
    archs = ("mlp[8]", "mcnn")
    config = BootstrapConfig(template, ns=(32, 64), archs=archs, seeds=(0, 1))
    result = run_bootstrap(config, out=tmp_path, progress=False)
    assert sorted(built) == sorted([(a, "ideal", None, s) for a in archs for s in (0, 1)]
                                   + [(a, "real", n, s) for a in archs for s in (0, 1) for n in (32, 64)])
    assert len(result.trained) == 12 and not result.reused
    for name in ("mlp-8/ideal-seed1", "mlp-8/real-n64-seed0", "mcnn/real-n32-seed1"):
        assert (tmp_path / name / "result.json").exists()
    ideal = json.loads((tmp_path / "mcnn/ideal-seed0/config.json").read_text())
    assert ideal["n"] is None and ideal["arch"] == "mcnn" and ideal["width"] == 2
    assert json.loads((tmp_path / "mlp-8/real-n64-seed1/config.json").read_text())["width"] is None

    with open(tmp_path / "gap.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["model"], r["n"], r["seeds"]) for r in table] == [
        ("mlp[8]", "32", "2"), ("mlp[8]", "64", "2"), ("mcnn", "32", "2"), ("mcnn", "64", "2")]
    assert all(r["steps"] == "4" and r["gap_T_sd"] for r in table)
    gap = (tmp_path / "gap.md").read_text()
    assert "| mcnn | 64 |" in gap and "T = 4 steps." in gap
    with open(tmp_path / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert len(curves) == 12 * 3  # every run logs steps 0, 2, 4
    with Image.open(result.plot) as im:
        assert im.format == "PNG" and im.size == (980, 760)  # two models: two columns
        assert "T=4 steps, batch 16" in im.text["Title"] and "< 0.01" in im.text["Description"]
        assert "2 seeds" in im.text["Description"]

    built.clear()
    more = BootstrapConfig(template, ns=(32, 64, 48), archs=archs, seeds=(0, 1))
    again = run_bootstrap(more, out=tmp_path, progress=False)
    assert sorted(built) == sorted((a, "real", 48, s) for a in archs for s in (0, 1))
    assert len(again.reused) == 12 and len(again.trained) == 4
    assert [r["n"] for r in again.report.gap] == [32, 64, 48, 32, 64, 48]


def test_budgets_are_checked_before_any_training(make_dataset, tmp_path, built):
    data = make_dataset(n_train=200)
    short = TrainConfig(data=str(data), arch="mlp", width=4, **{**TINY, "steps": 13})  # 208 > 200
    with pytest.raises(NotEnoughSamplesError) as err:
        run_bootstrap(BootstrapConfig(short, ns=(32, 300, 8)), out=tmp_path / "a", progress=False)
    text = str(err.value)
    assert text.startswith("no run started:") and "13 steps x batch 16 = 208 fresh samples" in text
    assert "--wrap" in text and "N=300 is more than the 200" in text and "N=8 is smaller" in text
    assert built == [] and not (tmp_path / "a").exists()

    args = ["bootstrap", "--data", str(data), "--n", "32", "--arch", "mlp", "--width", "4",
            "--steps", "13", "--batch-size", "16", "--log-every", "2", "--log-dense", "none",
            "--out", str(tmp_path / "b")]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 1 and "Error: no run started" in done.output and built == []
    assert not (tmp_path / "b").exists()


def test_budgets_read_the_index_once(make_dataset, monkeypatch):
    """check_budgets reads (and checks) index.parquet once, not once for the pool, once for the
    test split and once more per stream (3 + len(N) reads before), and its streams still check."""
    import cifar5m.shards.catalog
    from cifar5m.train.bootstrap import check_budgets
    from cifar5m.train.stream import SampleStream, StreamConfig

    reads: list[str] = []
    original = cifar5m.shards.catalog.read_index_data

    def counted(source, manifest):
        reads.append(source.url)
        return original(source, manifest)

    monkeypatch.setattr(cifar5m.shards.catalog, "read_index_data", counted)
    streams: list[tuple] = []  # (world, n, given a catalog) of every stream check_budgets builds
    init = SampleStream.__init__

    def recorded(self, config, *, catalog=None):
        streams.append((config.world, config.n, catalog is not None))
        init(self, config, catalog=catalog)

    monkeypatch.setattr(SampleStream, "__init__", recorded)
    data = make_dataset(n_train=200, n_test=20)
    config = BootstrapConfig(TrainConfig(data=str(data), arch="mlp", width=4, **TINY), ns=(32, 64, 48))
    budget = check_budgets(config)
    assert (budget.pool, len(reads)) == (200, 1)
    assert streams == [("ideal", None, True), ("real", 32, True), ("real", 64, True), ("real", 48, True)]
    stream = SampleStream(StreamConfig(str(data), batch_size=16))  # alone: it loads its catalog
    assert len(reads) == 2
    with pytest.raises(Exception, match="split 'test'"):  # a catalog of another split is refused
        SampleStream(StreamConfig(str(data), batch_size=16, split="test"), catalog=stream.catalog)


def test_wrap_is_recorded_and_marked(make_dataset, tmp_path):
    data = make_dataset(n_train=64)
    args = ["bootstrap", "--data", str(data), "--n", "32", "--arch", "mlp", "--width", "4",
            "--steps", "6", "--batch-size", "16", "--log-every", "3", "--log-dense", "none",
            "--test-limit", "32", "--wrap", "--out", str(tmp_path / "boot")]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    assert "--wrap: past one pass" in done.output
    ideal = tmp_path / "boot" / "mlp" / "ideal-seed0"
    assert json.loads((ideal / "config.json").read_text())["wrap"] is True
    assert json.loads((ideal / "result.json").read_text())["wrapped"] is True
    real = tmp_path / "boot" / "mlp" / "real-n32-seed0"
    assert json.loads((real / "config.json").read_text())["wrap"] is False
    assert json.loads((tmp_path / "boot" / "bootstrap.json").read_text())["template"]["wrap"] is True
    with Image.open(tmp_path / "boot" / "bootstrap.png") as im:
        assert "IDEAL WORLD WRAPPED" in im.text["Title"]

    train = ["train", "--data", str(data), "--world", "ideal", "--arch", "mlp", "--width", "4",
             "--steps", "6", "--batch-size", "16", "--log-every", "3", "--test-limit", "32"]
    refused = CliRunner().invoke(cli, [*train, "--out", str(tmp_path / "t0")])
    assert refused.exit_code == 1 and "--wrap" in refused.output
    done = CliRunner().invoke(cli, [*train, "--wrap", "--out", str(tmp_path / "t1")])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "t1" / "config.json").read_text())["wrap"] is True
    assert json.loads((tmp_path / "t1" / "result.json").read_text())["wrapped"] is True


def test_cli_bootstrap_sweep(make_dataset, tmp_path):
    data = make_dataset()
    args = ["bootstrap", "--data", str(data), "--n", "32,64", "--arch", "mlp[8,8],mlp", "--width", "4",
            "--steps", "4", "--batch-size", "16", "--log-every", "2", "--log-dense", "none",
            "--test-limit", "32", "--threshold", "0.5", "--out", str(tmp_path)]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    assert "| mlp[8,8] | 64 |" in done.output and "| mlp | 32 |" in done.output
    assert "Trained 6 runs, reused 0" in done.output and (tmp_path / "bootstrap.png").exists()
    assert json.loads((tmp_path / "bootstrap.json").read_text())["threshold"] == 0.5
    again = CliRunner().invoke(cli, args)
    assert "Trained 0 runs, reused 6" in again.output
    no_n = CliRunner().invoke(cli, [a for a in args if a not in ("--n", "32,64")])
    assert no_n.exit_code == 2 and "--n" in no_n.output
    bad = CliRunner().invoke(cli, [*args[:-2], "--arch", "resnet9000", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "unknown model 'resnet9000'" in bad.output


def test_split_archs_keeps_width_lists_whole():
    assert split_archs("preresnet18, mlp[512,512,512],mcnn") == ("preresnet18", "mlp[512,512,512]", "mcnn")


def test_generated_world_end_to_end(tmp_path, built):
    """`cifar5m generate` (any model and labeler; tiny random ones here), then the sweep on it,
    evaluated on the generated world's own test split."""
    from generate_helpers import save_tiny_labeler, save_tiny_unet

    from cifar5m.shards.reader import Dataset

    unet, labeler = save_tiny_unet(tmp_path / "unet"), save_tiny_labeler(tmp_path / "labeler")
    world = tmp_path / "world"
    made = CliRunner().invoke(cli, [
        "generate", "--model", str(unet), "--labeler", str(labeler), "--count", "240", "--test-count",
        "48", "--sampler", "ddim", "--steps", "1", "--shard-size", "96", "--image-format", "npy",
        "--batch-size", "48", "--device", "cpu", "--out", str(world)])
    assert made.exit_code == 0, made.output
    assert len(Dataset(world).split("train")) == 192 and len(Dataset(world).split("test")) == 48
    args = ["bootstrap", "--data", str(world), "--n", "32,96", "--arch", "mlp[8]", "--seeds", "0,1",
            "--steps", "12", "--batch-size", "16", "--log-every", "4", "--log-dense", "none",
            "--out", str(tmp_path / "boot")]  # the ideal world: 12 x 16 = all 192 train samples once
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    assert sorted(built) == sorted([("mlp[8]", "ideal", None, s) for s in (0, 1)]
                                   + [("mlp[8]", "real", n, s) for n in (32, 96) for s in (0, 1)])
    config = json.loads((tmp_path / "boot" / "mlp-8" / "ideal-seed0" / "config.json").read_text())
    assert config["data"] == str(world) and config["test_split"] == "test" and config["wrap"] is False
    result = json.loads((tmp_path / "boot" / "mlp-8" / "ideal-seed0" / "result.json").read_text())
    assert result["wrapped"] is False and result["final"]["step"] == 12
    assert "| mlp[8] | 96 |" in (tmp_path / "boot" / "gap.md").read_text()
    short = CliRunner().invoke(cli, [*args[:-2], "--steps", "13", "--out", str(tmp_path / "short")])
    assert short.exit_code == 1 and "208 fresh samples but" in short.output and "192 train" in short.output


def test_a_stopped_sweep_resumes_onto_the_same_curves(make_dataset, tmp_path):
    data = make_dataset()
    base = ["bootstrap", "--data", str(data), "--n", "32", "--arch", "mlp", "--width", "4", "--steps", "6",
            "--batch-size", "16", "--log-every", "2", "--log-dense", "none", "--test-limit", "32",
            "--checkpoint-every", "2"]
    whole = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "whole")])
    stopped = CliRunner().invoke(cli, [*base, "--stop-after", "3", "--out", str(tmp_path / "parts")])
    assert whole.exit_code == 0 and stopped.exit_code == 0, stopped.output
    assert not (tmp_path / "parts" / "mlp" / "ideal-seed0" / "result.json").exists()
    resumed = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "parts")])
    assert resumed.exit_code == 0, resumed.output
    for name in ("mlp/ideal-seed0", "mlp/real-n32-seed0"):
        want = [json.loads(line) for line in (tmp_path / "whole" / name / "metrics.jsonl").read_text().splitlines()]
        got = [json.loads(line) for line in (tmp_path / "parts" / name / "metrics.jsonl").read_text().splitlines()]
        drop = ("images_per_s",)  # timing differs
        assert [{k: v for k, v in r.items() if k not in drop} for r in got] == \
               [{k: v for k, v in r.items() if k not in drop} for r in want]
    assert (tmp_path / "parts" / "gap.csv").read_text() == (tmp_path / "whole" / "gap.csv").read_text()
