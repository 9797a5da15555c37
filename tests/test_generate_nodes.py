"""Several nodes writing one dataset straight to S3 (moto's server on 127.0.0.1).

Each "node" is its own process tree with its own HOME, TMPDIR and --staging, so
nothing can be shared through a disk: the ranks meet only through the rendezvous
and the store. The results must verify and be byte-identical to one local process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from generate_helpers import dataset_digest, save_tiny_labeler, save_tiny_unet
from test_kill_resume import PARK

from cifar5m.core.errors import ConfigMismatchError
from cifar5m.dataset_server.launcher import free_port
from cifar5m.generator.config import GenerateConfig
from cifar5m.generator.pipeline import run
from cifar5m.shards.verify import verify_dataset

REPO = Path(__file__).resolve().parents[1]
# 4 shards of 10 (test-000000, train-000000..2), 2 DDPM steps of the tiny UNet.
SMALL = {"count": 40, "test_count": 10, "shard_size": 10, "sampler": "ddpm", "steps": 2, "batch_size": 16}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("models")
    return {"unet": save_tiny_unet(base / "unet"), "labeler": save_tiny_labeler(base / "labeler")}


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ds"
    run(GenerateConfig(out=str(out), model=str(models["unet"]), labeler=str(models["labeler"]), **SMALL),
        progress=False)
    return out


def generate_args(models: dict[str, Path], url: str, options: dict) -> list[str]:
    args = ["generate", "--out", url, "--model", str(models["unet"]), "--labeler", str(models["labeler"]),
            "--storage-options", json.dumps(options), "--workers", "1"]
    for k, v in SMALL.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def node_env(node: Path, **extra: str) -> dict[str, str]:
    """A node's environment: its own home and temp dir, one thread."""
    for sub in ("home", "tmp"):
        (node / sub).mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HOME": str(node / "home"), "TMPDIR": str(node / "tmp"),
            "OMP_NUM_THREADS": "1", **extra}



def download(url: str, options: dict, dest: Path) -> Path:
    import fsspec

    fs, base = fsspec.core.url_to_fs(url, **options)
    dest.mkdir(parents=True)
    for path in fs.ls(base, detail=False):
        fs.get_file(path, str(dest / path.rsplit("/", 1)[1]))
    return dest


def written_files(node: Path) -> list[str]:
    return sorted(p.name for p in node.rglob("*") if p.suffix in (".tar", ".parquet", ".json"))


def wait_all(procs: list[subprocess.Popen], logs: list[Path], *, timeout: float = 600) -> list[int]:
    """Exit codes of ``procs``; the timeout only guards against a hang (2 loaded CI cores)."""
    deadline = time.monotonic() + timeout
    codes = []
    for proc, log in zip(procs, logs, strict=True):
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"a node did not finish in {timeout:.0f} s: {log.read_text()[-3000:]}")
    return codes


@pytest.mark.slow
def test_two_torchrun_nodes_write_s3_directly_and_match_one_local_process(models, reference, moto_s3,
                                                                           tmp_path) -> None:
    url, options = "s3://bucket/two-nodes", moto_s3.options
    port = free_port()
    procs, logs = [], []
    for node_rank in range(2):
        node = tmp_path / f"node{node_rank}"
        logs.append(node / "log.txt")
        node.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job1",
               "--rdzv-conf", f"is_host={str(node_rank == 0).lower()}", "--max-restarts", "0",
               "-m", "cifar5m", *generate_args(models, url, options), "--staging", str(node / "scratch")]
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=node_env(node), stdout=log,
                                          stderr=subprocess.STDOUT))
    codes = wait_all(procs, logs)
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    got = download(url, options, tmp_path / "got")
    assert verify_dataset(got, decode=True, progress=False).shards == 4
    assert dataset_digest(got) == dataset_digest(reference)
    for node_rank in range(2):  # no shard, part or manifest was staged on either node's disk
        assert written_files(tmp_path / f"node{node_rank}") == []


@pytest.mark.slow
def test_rank_killed_mid_run_then_rerun_with_other_rank_count(models, reference, moto_s3, tmp_path,
                                                              monkeypatch) -> None:
    import fsspec

    url, options = "s3://bucket/killed", moto_s3.options
    port, marker = free_port(), tmp_path / "parked.txt"
    procs, logs = [], []
    for rank in range(2):  # the environment torchrun gives each rank, one rank per node
        node = tmp_path / f"node{rank}"
        node.mkdir()
        logs.append(node / "log.txt")
        env = node_env(node, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        # Rank 1 owns train-000000 and train-000002; it parks uploading the part of the second,
        # after its shard: train-000000 is finished, train-000002 is not.
        park = ["cifar5m.generator.store", "Store.put", "2", ".parquet", str(marker)] if rank == 1 else None
        cmd = ([sys.executable, "-c", PARK, *park] if park else [sys.executable, "-m", "cifar5m"])
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([*cmd, *generate_args(models, url, options)], cwd=REPO, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 600
    while not marker.exists():
        if procs[1].poll() is not None or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"rank 1 did not park: {logs[1].read_text()[-3000:]}")
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    codes = wait_all(procs, logs)
    assert codes[1] == -signal.SIGKILL
    assert codes[0] == 1 and "lost contact with the other ranks" in logs[0].read_text()  # not a hang
    fs, base = fsspec.core.url_to_fs(url, **options)
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.find(base))
    assert names == ["state.json", "test-000000.parquet", "test-000000.tar", "train-000000.parquet",
                     "train-000000.tar", "train-000001.parquet", "train-000001.tar", "train-000002.tar"]
    # (no lease: rank 0 failed cleanly and released it; no manifest: nothing was finished)
    data = bytearray(fs.cat_file(f"{base}/train-000001.tar"))
    data[1000] ^= 0xFF
    fs.pipe_file(f"{base}/train-000001.tar", bytes(data))  # a finished shard damaged in the store

    from cifar5m.generator.producer import Producer

    real, made = Producer.shard, []
    monkeypatch.setattr(Producer, "shard", lambda self, plan, **kw: made.append(plan.file) or real(self, plan, **kw))
    monkeypatch.setattr("cifar5m.generator.lease.SETTLE", 0.0)
    rerun = GenerateConfig(out=url, model=str(models["unet"]), labeler=str(models["labeler"]), **SMALL)
    with pytest.raises(ConfigMismatchError, match=rf"^{url} holds a dataset made with other settings \(seed"):
        run(replace(rerun, seed=1), progress=False, storage_options=options)  # checked against the store
    assert made == []
    run(rerun, progress=False, storage_options=options)  # one rank now
    assert sorted(made) == ["train-000001.tar", "train-000002.tar"]  # the damaged and the unfinished
    got = download(url, options, tmp_path / "got")
    assert verify_dataset(got, decode=True, progress=False).shards == 4
    assert dataset_digest(got) == dataset_digest(reference)
