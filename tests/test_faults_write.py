"""Faults on the write side: one writer per directory, a full disk, a missing source.

Writers race for real (two ``cifar5m import`` processes), a holder is killed with
SIGKILL, a disk fills up (a 1 MB tmpfs when running as root, else skipped; and an
injected ENOSPC everywhere), an import source does not exist.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cifar5m.cli.main import cli
from cifar5m.core.errors import GenerationError, OutputLockedError
from cifar5m.shards.lock import LOCK_NAME, DirectoryLock, holder
from cifar5m.shards.reader import Dataset
from cifar5m.shards.synthetic import synthetic_images
from cifar5m.shards.verify import verify_dataset
from tests.test_faults_read import error_line

HOLD = """
import sys
from cifar5m.shards.writer import DatasetWriter, Sample
from tests.test_faults_write import npz_fingerprint
w = DatasetWriter(sys.argv[1], fingerprint=npz_fingerprint(sys.argv[2]), image_format="png", shard_size=50)
print("holding", flush=True)
sys.stdin.read()  # never returns: the test kills this process
"""


def npz_part(path: Path, n: int) -> Path:
    np.savez(path, X=synthetic_images(n, seed=1), Y=np.arange(n) % 10)
    return path


def npz_fingerprint(source: str) -> dict:
    """The fingerprint `cifar5m import SOURCE` uses (so the holder looks like that import)."""
    from cifar5m.shards.importer import resolve_config

    return resolve_config([source]).fingerprint()


def import_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cifar5m", "import", str(src), "--out", str(out),
            "--shard-size", "50", *extra]


def test_a_second_writer_is_refused_and_a_killed_holder_never_blocks(tmp_path):
    src = npz_part(tmp_path / "cifar5m_part0.npz", 120)
    out = tmp_path / "ds"
    hold = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(src)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert hold.stdout.readline().strip() == "holding"
        for fmt in ("png", "npy"):  # same settings and other settings: both refused at once
            done = subprocess.run(import_cmd(src, out, "--image-format", fmt), capture_output=True,
                                  text=True, timeout=120)
            line = error_line(done.returncode, done.stderr)
            assert f"{out} is being written in another process (PID {hold.pid}" in line
        assert holder(out)["pid"] == hold.pid
    finally:
        hold.send_signal(signal.SIGKILL)
        hold.wait()
    assert (out / LOCK_NAME).exists()  # the dead holder's file stays; its lock went with it
    done = subprocess.run(import_cmd(src, out), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert verify_dataset(out, progress=False).samples == {"train": 120}
    assert not (out / LOCK_NAME).exists()


def test_two_imports_started_together_never_leave_a_mixed_dataset(tmp_path):
    src = npz_part(tmp_path / "cifar5m_part0.npz", 400)
    out = tmp_path / "ds"
    procs = [subprocess.Popen(import_cmd(src, out, "--image-format", fmt), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for fmt in ("png", "npy")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    line = error_line(1, loser)
    assert "is being written in another process" in line or "already holds" in line
    winner = ("png", "npy")[[code for code, _ in results].index(0)]
    assert Dataset(out).manifest.image_format == winner
    assert verify_dataset(out, decode=True, progress=False).decoded == 400


def test_locks_of_the_trainer_download_and_generate(tmp_path, make_dataset):
    data = make_dataset(n_train=40, n_test=10, shard_size=20)
    run = tmp_path / "run"
    with DirectoryLock(run):  # another open file description: a second holder, as in another process
        result = CliRunner().invoke(cli, ["train", "--data", str(data), "--world", "ideal", "--steps", "1",
                                          "--batch-size", "8", "--arch", "mlp", "--out", str(run)])
        assert result.exit_code == 1 and f"{run} is being written" in result.output, result.output
        assert f"PID {os.getpid()}" in result.output and not (run / "config.json").exists()
    from cifar5m.train.bootstrap import run_bootstrap
    from cifar5m.train.config import BootstrapConfig, TrainConfig

    boot = tmp_path / "boot"
    with DirectoryLock(boot), pytest.raises(OutputLockedError, match=rf"{boot} is being written by a bootstrap"):
        run_bootstrap(BootstrapConfig(TrainConfig(data=str(data), steps=1, batch_size=8), ns=(20,), archs=("mlp",)), out=boot)
    assert not (boot / "bootstrap.json").exists()
    from cifar5m.dataset_server.download import download

    local = tmp_path / "local"
    with DirectoryLock(local), pytest.raises(OutputLockedError, match=rf"{local} is being downloaded into"):
        download("lab/ds", endpoint="http://127.0.0.1:9", local_dir=local)  # refused before any request
    from cifar5m.generator import pipeline, rendezvous

    gen = tmp_path / "gen"
    with DirectoryLock(gen), pytest.raises(OutputLockedError, match=rf"{gen} is being generated"):
        pipeline.prepare(None, gen, {}, [], lock=DirectoryLock(gen, what="generated"))
    with DirectoryLock(gen), pytest.raises(GenerationError, match="not by rank 0 of this job"):
        rendezvous.check_owner(gen, {"pid": -1, "host": "elsewhere"})  # ranks > 0 check the holder


def test_a_missing_import_source_is_named_and_leaves_nothing(tmp_path):
    out = tmp_path / "ds"
    for missing in ("nope", "cifar5m_part0.npz"):
        result = CliRunner().invoke(cli, ["import", str(tmp_path / missing), "--out", str(out)])
        assert result.exit_code == 1 and f"{tmp_path / missing} does not exist" in result.output
        assert not out.exists()
    bad = tmp_path / "cifar5m_part1.npz"
    bad.write_bytes(b"not a zip")  # fails once the writer has opened the output
    result = CliRunner().invoke(cli, ["import", str(bad), "--out", str(out)])
    assert result.exit_code == 1 and "is not an npz" in result.output
    assert not out.exists()  # no _work/ (nor an empty directory) left behind
    nested = tmp_path / "new" / "dirs" / "ds"
    result = CliRunner().invoke(cli, ["import", str(bad), "--out", str(nested)])
    assert result.exit_code == 1 and not (tmp_path / "new").exists()  # nor the parents it made


class FullDisk:
    """``os.fdopen`` files whose writes fail with ENOSPC once ``budget`` bytes were written."""

    def __init__(self, budget: int) -> None:
        self.budget, self.real = budget, os.fdopen

    def __call__(self, fd, *args, **kwargs):
        f = self.real(fd, *args, **kwargs)
        write, disk = f.write, self

        def limited(data):
            if len(data) > disk.budget:
                raise OSError(errno.ENOSPC, "No space left on device")
            disk.budget -= len(data)
            return write(data)

        f.write = limited
        return f


def test_a_full_disk_is_one_line_saying_how_much_space_is_needed(tmp_path, monkeypatch):
    src = npz_part(tmp_path / "cifar5m_part0.npz", 300)
    out = tmp_path / "ds"
    args = ["import", str(src), "--out", str(out), "--shard-size", "50", "--image-format", "npy"]
    monkeypatch.setattr(os, "fdopen", FullDisk(3 * 50 * 5120))  # room for 2 shards and their parts
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: no space left on the device of") and "train-000002.tar" in line
    assert "The import needs about 1.5 MB for 300 samples" in line
    monkeypatch.undo()  # space freed: the same command resumes
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert verify_dataset(out, progress=False).samples == {"train": 300}


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_import_into_a_full_tmpfs(tmp_path, tiny_tmpfs):
    src = npz_part(tmp_path / "cifar5m_part0.npz", 600)
    done = subprocess.run(import_cmd(src, tiny_tmpfs / "ds", "--image-format", "npy"),
                          capture_output=True, text=True, timeout=120)
    line = error_line(done.returncode, done.stderr)
    assert "no space left on the device of" in line and "The import needs about 3.1 MB for 600" in line
    assert not list((tiny_tmpfs / "ds").glob(".*.tmp"))  # no half-written temp file left
    assert json.loads((tiny_tmpfs / "ds" / "_work" / "state.json").read_text())  # resumable


def test_an_output_that_cannot_be_created_is_one_named_error(tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(cli, ["import", str(npz_part(tmp_path / "cifar5m_part0.npz", 10)),
                                      "--out", str(tmp_path / "file" / "ds")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{tmp_path / 'file' / 'ds'} cannot be created (Not a directory)" in result.output
