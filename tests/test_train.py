"""The trainer end to end on tiny datasets: both worlds, every model, resume, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cifar5m.cli.main import cli
from cifar5m.core.errors import ConfigMismatchError
from cifar5m.train.config import TrainConfig
from cifar5m.train.metrics import read_rows
from cifar5m.train.models import MODELS
from cifar5m.train.trainer import train

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def tiny(data: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), world="real", n=100, arch="mlp", width=8, steps=6, batch_size=16,
                log_every=2, log_dense=(), checkpoint_every=100, seed=1)
    return TrainConfig(**{**base, **kw})


def curve(rows: list[dict]) -> list[dict]:
    """Rows without wall-clock fields (everything else must be bit-identical on CPU)."""
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from cifar5m.shards.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("d") / "ds")


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("world", ["real", "ideal"])
def test_both_worlds_train_every_model(data, tmp_path, arch, world):
    result = train(tiny(data, arch=arch, world=world, augment="crop-flip"), out=tmp_path, progress=False)
    assert result.finished and result.step == 6
    assert [r["step"] for r in result.rows] == [0, 2, 4, 6]
    last = result.rows[-1]
    assert 0 <= last["test_soft_error"] <= 1 and 0 <= last["test_error"] <= 1
    assert ("train_soft_error" in last) == (world == "real")  # the ideal world has no fixed train set
    assert last["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine reached 0 at T
    assert read_rows(tmp_path / "metrics.jsonl") == result.rows
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "test_soft_error", "test_error", "test_loss"} <= set(header)
    saved = TrainConfig.from_json((tmp_path / "config.json").read_text())
    assert saved == tiny(data, arch=arch, world=world, augment="crop-flip")
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 6


def test_the_worlds_differ_only_in_their_samples(data, tmp_path):
    real = train(tiny(data, world="real", n=200, record_keys=True), out=tmp_path / "r", progress=False)
    ideal = train(tiny(data, world="ideal", record_keys=True), out=tmp_path / "i", progress=False)
    assert real.rows[0]["test_soft_error"] == ideal.rows[0]["test_soft_error"]  # same initial weights
    real_keys = (tmp_path / "r" / "keys-rank0.txt").read_text().split()
    ideal_keys = (tmp_path / "i" / "keys-rank0.txt").read_text().split()
    assert len(set(ideal_keys)) == len(ideal_keys) == 6 * 16  # every ideal sample fresh
    small = train(tiny(data, world="real", n=20, record_keys=True), out=tmp_path / "s", progress=False)
    small_keys = (tmp_path / "s" / "keys-rank0.txt").read_text().split()
    assert len(set(small_keys)) == 20 and len(small_keys) == 96  # N samples reused (epochs)
    assert small.rows[-1]["epoch"] == pytest.approx(96 / 20)
    assert real_keys != ideal_keys


@pytest.mark.parametrize("world", ["real", "ideal"])
def test_stopped_and_resumed_run_matches_an_uninterrupted_one(data, tmp_path, world):
    config = tiny(data, world=world, arch="preresnet18", steps=8, augment="crop-flip",
                  checkpoint_every=3)
    whole = train(config, out=tmp_path / "whole", progress=False)
    part = train(dataclasses.replace(config, stop_after=5), out=tmp_path / "cut", progress=False)
    assert not part.finished and part.step == 5
    assert not (tmp_path / "cut" / "result.json").exists()
    resumed = train(config, out=tmp_path / "cut", progress=False)
    assert resumed.finished
    assert curve(resumed.rows) == curve(whole.rows)
    assert curve(read_rows(tmp_path / "cut" / "metrics.jsonl")) == curve(whole.rows)


def test_a_finished_run_is_not_trained_again_and_other_settings_are_refused(data, tmp_path):
    config = tiny(data)
    first = train(config, out=tmp_path, progress=False)
    stamp = (tmp_path / "checkpoint.pt").stat().st_mtime_ns
    again = train(config, out=tmp_path, progress=False)
    assert again.rows == first.rows and (tmp_path / "checkpoint.pt").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigMismatchError, match=r"'lr': \(0.1, 0.2\)"):
        train(dataclasses.replace(config, lr=0.2), out=tmp_path, progress=False)


def test_cifar10_test_path_adds_its_metrics(data, tmp_path):
    result = train(tiny(data, cifar10_test=str(data), test_limit=20, train_eval_limit=30),
                   out=tmp_path, progress=False)
    last = result.rows[-1]
    assert {"cifar10_soft_error", "cifar10_error", "cifar10_loss"} <= set(last)
    assert last["cifar10_soft_error"] != last["test_soft_error"]  # 50 vs the first 20 samples


def test_cli_train_stops_and_resumes(data, tmp_path):
    args = ["train", "--data", str(data), "--world", "real", "--n", "50", "--arch", "mlp",
            "--width", "8", "--steps", "4", "--batch-size", "16", "--log-every", "2",
            "--log-dense", "none", "--out", str(tmp_path / "run")]
    first = CliRunner().invoke(cli, [*args, "--stop-after", "2"])
    assert first.exit_code == 0, first.output
    assert "stopped (rerun the same command to resume)" in first.output
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert "finished: step 4" in second.output
    bad = CliRunner().invoke(cli, [*args[:-1], str(tmp_path / "other"), "--world", "ideal",
                                   "--steps", "99"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: ") and "fresh samples" in bad.output


@pytest.mark.slow
def test_sigkill_mid_run_resumes_onto_the_same_curve_and_keys(data, tmp_path):
    """A real SIGKILL (no cleanup at all) between checkpoints, then the same command again."""
    args = [sys.executable, "-m", "cifar5m", "train", "--data", str(data), "--world", "ideal",
            "--arch", "preresnet18", "--width", "8", "--steps", "12", "--batch-size", "16",
            "--log-every", "2", "--log-dense", "none", "--checkpoint-every", "3",
            "--augment", "crop-flip", "--seed", "1", "--record-keys", "--out", str(tmp_path / "killed")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    keys = tmp_path / "killed" / "keys-rank0.txt"
    deadline = time.monotonic() + 600  # polls for progress: a loaded 2-core CI box is slow
    while time.monotonic() < deadline and proc.poll() is None:
        # step 4 logged and keys of step 5 written: past the checkpoint at 3, before the one at 6
        if metrics.exists() and len(read_rows(metrics)) >= 3 and keys.exists() \
                and len(keys.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = len(read_rows(metrics))
    keys_at_kill = len(keys.read_text().splitlines())
    assert killed_at >= 3 and keys_at_kill >= 5, proc.stderr.read().decode()[-2000:]
    subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    whole = train(tiny(data, world="ideal", arch="preresnet18", steps=12, checkpoint_every=3,
                       augment="crop-flip", record_keys=True), out=tmp_path / "whole", progress=False)
    assert killed_at < len(whole.rows)  # it really was cut short
    assert curve(read_rows(metrics)) == curve(whole.rows)
    got = keys.read_text().split()
    assert got == (tmp_path / "whole" / "keys-rank0.txt").read_text().split()
    assert len(got) == len(set(got)) == 12 * 16  # the re-trained steps' keys are not doubled


def test_class_balanced_real_world_subset(data, tmp_path):
    train(tiny(data, n=50, class_balanced=True, record_keys=True, steps=4), out=tmp_path, progress=False)
    keys = set((tmp_path / "keys-rank0.txt").read_text().split())
    labels = [int(k[1:]) % 10 for k in keys]  # the fixture's label is position % 10
    assert len(keys) == 50 and all(labels.count(c) == 5 for c in range(10))


def test_train_reads_s3_with_storage_options_through_the_cli(data, tmp_path, moto_s3):
    """--storage-options reaches the stream and the test split (moto's S3 on 127.0.0.1)."""
    url = moto_s3(data, "ds")
    args = ["train", "--data", url, "--world", "ideal", "--arch", "mlp", "--width",
            "8", "--steps", "4", "--batch-size", "16", "--log-every", "2", "--log-dense", "none",
            "--seed", "1", "--record-keys", "--storage-options", json.dumps(moto_s3.options),
            "--out", str(tmp_path / "s3")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    local = train(tiny(data, world="ideal", steps=4, record_keys=True), out=tmp_path / "local",
                  progress=False)
    assert curve(read_rows(tmp_path / "s3" / "metrics.jsonl")) == curve(local.rows)
    assert (tmp_path / "s3" / "keys-rank0.txt").read_text() == \
        (tmp_path / "local" / "keys-rank0.txt").read_text()
    assert "secret" not in (tmp_path / "s3" / "config.json").read_text()  # credentials not saved
