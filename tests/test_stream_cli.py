"""``cifar5m stream``: stats with the exactly-once check, --state resume, tar into webdataset."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from cifar5m.cli.main import cli
from cifar5m.shards.synthetic import synthetic_images, write_synthetic_dataset
from cifar5m.train.stream import SampleStream, StreamConfig


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("cli") / "ds", n_train=120, n_test=10,
                         shard_size=32, image_format="png")


def run(*args: str):
    return CliRunner().invoke(cli, ["stream", *args], catch_exceptions=False)


def test_stats_prints_counts_throughput_and_the_check(root):
    result = run(str(root), "--batch-size", "20", "--rank", "1", "--world-size", "2", "--limit", "4")
    assert result.exit_code == 0, result.output
    assert "delivered: 4 batches, 40 images" in result.output
    assert "exactly-once: OK; this rank 40 distinct of 40" in result.output
    assert "all 2 ranks: 80 distinct of 80" in result.output
    result = run(str(root), "--world", "real", "--n", "30", "--batch-size", "10", "--steps", "9", "--json")
    report = json.loads(result.stdout)
    assert report["exactly_once"] and report["rank_samples"] == 90 and report["rank_distinct"] == 30
    assert report["epochs"] == 3.0


def test_the_check_counts_off_plan_repeated_and_unknown_keys(root, monkeypatch):
    """Distinct delivered samples are counted by split position (no set of every key): a
    batch off the plan that repeats earlier samples and names a key the split lacks."""
    from cifar5m.cli.stream_check import run_stats

    stream = SampleStream(StreamConfig(str(root), batch_size=10, steps=4, return_keys=True))
    first: list[str] = []
    iterate = SampleStream.__iter__

    def tampered(self):
        for batch in iterate(self):
            if batch.step == 0:
                first.extend(batch.keys)
            if batch.step == 2:  # 8 samples of batch 0 again, 1 new one, 1 the split lacks
                batch = batch._replace(keys=[*first[:8], batch.keys[0], "nope"])
            yield batch

    monkeypatch.setattr(SampleStream, "__iter__", tampered)
    report = run_stats(stream, limit=None, progress=False)
    assert (report["rank_samples"], report["rank_distinct"], report["batches_off_plan"]) == (40, 32, 1)
    assert not report["exactly_once"]


def test_state_file_resumes_where_the_last_run_stopped(root, tmp_path):
    state = tmp_path / "state.json"
    first = json.loads(run(str(root), "--batch-size", "10", "--limit", "5", "--state", str(state),
                           "--json").stdout)
    assert json.loads(state.read_text())["next_batch"] == 5
    second = json.loads(run(str(root), "--batch-size", "10", "--world-size", "2", "--rank", "0",
                            "--state", str(state), "--json").stdout)
    assert first["next_batch"] == 5 and second["resumed_from"] == 5 and second["delivered_batches"] == 7


def test_errors_are_one_line(root):
    result = CliRunner().invoke(cli, ["stream", str(root), "--batch-size", "10", "--steps", "50"])
    assert result.exit_code == 1
    assert "Error: asked for 50 steps x batch 10 = 500 fresh samples" in result.output
    assert "holds 120" in result.output


def test_tar_output_reads_in_webdataset_through_pipe(root):
    wds = pytest.importorskip("webdataset")
    command = f"pipe:{sys.executable} -m cifar5m stream {root} --batch-size 12 --seed 7 --format tar"
    dataset = wds.WebDataset(command, shardshuffle=False).decode("rgb8").to_tuple("__key__", "png", "cls")
    got = list(dataset)
    expected = [k for b in SampleStream(StreamConfig(source=str(root), batch_size=12, seed=7,
                                                     return_keys=True)) for k in b.keys]
    assert [key for key, _, _ in got] == expected and len(expected) == 120
    images = synthetic_images(130)
    for key, image, label in got[:10]:
        np.testing.assert_array_equal(image, images[int(key[1:])])
        assert label == int(key[1:]) % 10


def _tar_keys(data: bytes) -> list[str]:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        return [m.name.rsplit(".", 1)[0] for m in tar if m.name.endswith(".png")]


def test_tar_sigterm_then_resume_delivers_each_key_exactly_once(root, tmp_path):
    import signal
    import subprocess

    state = tmp_path / "state.json"
    cmd = [sys.executable, "-m", "cifar5m", "stream", str(root), "--batch-size", "10", "--seed", "3",
           "--format", "tar", "--state", str(state), "--state-every", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    # ~540 kB of tar: the writer blocks on the 64 kB pipe long before the end
    head = proc.stdout.read(20_000)
    proc.send_signal(signal.SIGTERM)
    first = _tar_keys(head + proc.stdout.read())  # what was flushed before it stopped
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    saved = json.loads(state.read_text())["next_batch"]
    assert 0 < len(first) < 120 and len(first) == 10 * saved  # whole batches, all counted
    second = _tar_keys(subprocess.run(cmd, stdout=subprocess.PIPE, check=True, timeout=300).stdout)
    expected = [k for b in SampleStream(StreamConfig(source=str(root), batch_size=10, seed=3,
                                                     return_keys=True)) for k in b.keys]
    assert first + second == expected and len(set(expected)) == 120
    assert json.loads(state.read_text())["next_batch"] == 12


def test_real_world_smaller_than_a_batch_is_an_error(root):
    result = CliRunner().invoke(cli, ["stream", str(root), "--world", "real", "--n", "10",
                                      "--batch-size", "16"])
    assert result.exit_code == 1
    assert "n=10 is smaller than the global batch size 16" in result.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process start time from /proc")
def test_first_batch_is_timed_from_process_start(root):
    """Set-up (imports, catalog, plan) is part of the wait for the first batch."""
    import subprocess
    import time

    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cifar5m", "stream", str(root), "--batch-size", "10",
                           "--limit", "2", "--json"], capture_output=True, text=True, check=True)
    outside = time.monotonic() - t0
    report = json.loads(proc.stdout)
    assert 0 < report["first_batch_s"] < report["first_batch_from_start_s"] < outside
    text = run(str(root), "--batch-size", "10", "--limit", "2").output
    assert "s from process start, set-up included;" in text
