"""cifar5m generate on CPU with a tiny random UNet and labeler: samplers, determinism,
resume after SIGKILL, torchrun ranks, extend, filters, conditional models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from generate_helpers import dataset_digest, save_tiny_labeler, save_tiny_unet

from cifar5m.generator.config import GenerateConfig
from cifar5m.generator.pipeline import run
from cifar5m.shards.format import WORK_DIR
from cifar5m.shards.reader import Dataset

REPO = Path(__file__).resolve().parents[1]
# The reference run: 200 samples (40 test) in shards of 48, 2 DDPM steps, exact CPU kernels
# (batch-size invariant bytes; the CPU default is oneDNN).
REF = {"count": 200, "test_count": 40, "shard_size": 48, "sampler": "ddpm", "steps": 2, "exact_cpu": True}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("models")
    return {"unet": save_tiny_unet(base / "unet"), "labeler": save_tiny_labeler(base / "labeler"),
            "cond": save_tiny_unet(base / "cond", num_class_embeds=10)}


def config(models: dict[str, Path], out: Path, **kw) -> GenerateConfig:
    args = {**REF, "model": str(models["unet"]), "labeler": str(models["labeler"]), "batch_size": 32,
            "out": str(out), **kw}
    return GenerateConfig(**args)


@pytest.fixture(scope="module")
def reference(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ds"
    run(config(models, out), progress=False)
    return out


def cli(*args: str, log: Path) -> subprocess.Popen:
    """``cifar5m generate`` in a subprocess; its output goes to ``log`` (a pipe nobody reads
    while we poll could fill up with progress bars and stall the run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "cifar5m", "generate", *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def cli_args(models: dict[str, Path], out: Path, **kw) -> list[str]:
    opts = {**REF, "model": models["unet"], "labeler": models["labeler"], "batch_size": 32, **kw}
    args = ["--out", str(out)]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_reference_dataset_layout(reference: Path) -> None:
    ds = Dataset(reference)
    assert [s.file for s in ds.manifest.shards] == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar",
        "test-000000.tar"]
    test, train = ds.split("test"), ds.split("train")
    assert len(test) == 40 and len(train) == 160
    assert list(test.keys) == [f"s{i:010d}" for i in range(40)]
    assert list(train.keys) == [f"s{i:010d}" for i in range(40, 200)]
    idx = ds.index.to_pydict()
    probs = np.array(idx["probs"])
    assert probs.shape == (200, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert idx["label"] == list(probs.argmax(1))
    assert np.allclose(idx["confidence"], probs.max(1))
    assert idx["seed"] == [int(k[1:]) for k in idx["key"]]
    prov = ds.manifest.provenance
    assert prov["sampler"] == "ddpm" and prov["steps"] == 2 and len(prov["timesteps"]) == 2
    assert len(prov["model_sha256"]) == 64 and len(prov["labeler_sha256"]) == 64
    assert "count" not in prov["fingerprint"] and prov["count"] == 200
    batch = train.decode_shard("train-000000.tar")
    assert batch.images.shape == (48, 32, 32, 3) and batch.images.dtype == np.uint8
    assert batch.images.std() > 10  # noise-like, not constant


def test_same_command_other_batch_size_is_byte_identical(models, reference, tmp_path) -> None:
    run(config(models, tmp_path / "b", batch_size=7, workers=1), progress=False)
    assert dataset_digest(tmp_path / "b") == dataset_digest(reference)


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "unipc"])
def test_each_sampler_writes_a_deterministic_dataset(models, tmp_path, sampler) -> None:
    kw = {"sampler": sampler, "steps": 3, "count": 100, "test_count": 20, "shard_size": 40}
    man = run(config(models, tmp_path / "a", **kw), progress=False)
    assert sum(s.samples for s in man.shards) == 100 and len(man.shards) == 2 + 1
    assert man.provenance["sampler"] == sampler and len(man.provenance["timesteps"]) == 3
    run(config(models, tmp_path / "b", batch_size=13, **kw), progress=False)
    assert dataset_digest(tmp_path / "a") == dataset_digest(tmp_path / "b")


def wait_for_parts(proc: subprocess.Popen, work: Path, n: int, log: Path, *, timeout: float = 900) -> None:
    """Poll until ``n`` shards are finished; the timeout only guards against a hang (CI: 2 loaded cores)."""
    deadline = time.monotonic() + timeout
    while len(list(work.glob("*.parquet"))) < n:
        if proc.poll() is not None:
            pytest.fail(f"generate exited ({proc.returncode}) before {n} shards: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {n} finished shards after {timeout:.0f} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(models, reference, tmp_path) -> None:
    out = tmp_path / "ds"
    # batch 16 and 1 writer: 5 shards of ~3 batches each, so the kill lands mid-run.
    log = tmp_path / "generate.log"
    proc = cli(*cli_args(models, out, batch_size=16, workers=1), log=log)
    wait_for_parts(proc, out / WORK_DIR, 2, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = len(list((out / WORK_DIR).glob("*.parquet")))
    assert 2 <= parts < 5 and not (out / "manifest.json").exists()
    done = cli(*cli_args(models, out), log=log)
    assert done.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert dataset_digest(out) == dataset_digest(reference)


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(models, reference, tmp_path) -> None:
    out = tmp_path / "ds"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(  # --standalone: a free rendezvous port, no clash with other runs
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "cifar5m", "generate", *cli_args(models, out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert dataset_digest(out) == dataset_digest(reference)


def test_extend_count_equals_direct_run(models, reference, tmp_path) -> None:
    out = tmp_path / "ds"
    first = run(config(models, out, count=130), progress=False)  # last train shard partial (42)
    assert [s.samples for s in first.shards if s.split == "train"] == [48, 42]
    run(config(models, out), progress=False)
    assert dataset_digest(out) == dataset_digest(reference)
    again = run(config(models, out), progress=False)  # same count: nothing to do
    assert again is not None and dataset_digest(out) == dataset_digest(reference)


def test_extend_killed_mid_way_resumes_to_the_direct_run(models, reference, tmp_path, monkeypatch) -> None:
    from cifar5m.core.errors import DatasetNotFoundError

    out = tmp_path / "ds"
    run(config(models, out, count=130), progress=False)  # train shards: 48, 42
    crash_after(monkeypatch, 1)  # rewrites train-000001 at 48, dies on train-000002
    with pytest.raises(KeyboardInterrupt):
        run(config(models, out, workers=1), progress=False)
    with pytest.raises(DatasetNotFoundError, match="unfinished write"):
        Dataset(out)  # begin took the old manifest away: no reader sees stale offsets
    run(config(models, out), progress=False)
    assert dataset_digest(out) == dataset_digest(reference)


def test_conditional_model_labels_by_construction_and_records_agreement(models, tmp_path) -> None:
    kw = {"model": str(models["cond"]), "count": 60, "test_count": 20, "shard_size": 20, "sampler": "ddim"}
    man = run(config(models, tmp_path / "a", **kw), progress=False)
    idx = Dataset(tmp_path / "a").index.to_pydict()
    assert idx["label"] == [i % 10 for i in range(60)] == idx["cond_label"]
    top = np.array(idx["probs"]).argmax(1)
    assert man.provenance["labeler_agreement"] == pytest.approx(float(np.mean(top == idx["label"])))
    man = run(config(models, tmp_path / "b", labeler="none", **kw), progress=False)
    idx = Dataset(tmp_path / "b").index.to_pydict()
    assert idx["label"] == [i % 10 for i in range(60)] and idx["probs"] == [None] * 60


def test_min_confidence_drops_and_balance_evens_classes(models, tmp_path) -> None:
    kw = {"model": str(models["cond"]), "count": 40, "test_count": 20, "shard_size": 20,
          "sampler": "ddim", "steps": 2}
    run(config(models, tmp_path / "ref", **kw), progress=False)
    ref = Dataset(tmp_path / "ref").index.to_pydict()
    conf, labels = np.array(ref["confidence"]), np.array(ref["label"])
    # Each class keeps at least half of its candidates; some samples are dropped.
    threshold = float(min(np.median(conf[labels == c]) for c in range(10)))
    assert (conf < threshold).any()
    man = run(config(models, tmp_path / "a", min_confidence=threshold, balance=True, **kw), progress=False)
    idx = Dataset(tmp_path / "a").index.to_pydict()
    assert len(idx["key"]) == 40 and min(idx["confidence"]) >= threshold
    assert [s.samples for s in man.shards] == [20, 20]
    for split in ("train", "test"):
        labels = [lab for lab, s in zip(idx["label"], idx["split"], strict=True) if s == split]
        assert np.bincount(labels, minlength=10).tolist() == [2] * 10
    keys = [int(k[1:]) for k in idx["key"]]
    assert len(set(keys)) == 40 and max(keys) >= 40  # candidates beyond the first 40 were used


def test_filters_that_cannot_fill_a_shard_fail_clearly(models, tmp_path, monkeypatch) -> None:
    from cifar5m.core.errors import GenerationError

    monkeypatch.setattr("cifar5m.generator.pipeline.FILTER_STRIDE", 2)
    with pytest.raises(GenerationError, match="passed --min-confidence"):
        run(config(models, tmp_path / "a", min_confidence=0.99, count=12, test_count=2, shard_size=10,
                   steps=1), progress=False)


def test_fsspec_url_output_is_written_straight_to_the_store(models, tmp_path, monkeypatch) -> None:
    import fsspec

    monkeypatch.setattr("cifar5m.generator.lease.SETTLE", 0.0)
    url = f"memory://cifar5m-test/{tmp_path.name}/ds"
    run(config(models, url, count=30, test_count=10, shard_size=10, steps=1,
               staging=str(tmp_path / "scratch")), progress=False)
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(url.removeprefix("memory:/"), detail=False))
    assert names == ["README.md", "generate_config.json", "index.parquet", "manifest.json",
                     "test-000000.tar", "train-000000.tar", "train-000001.tar"]  # no _work/, no lease
    ds = Dataset(url)
    assert len(ds.split("train")) == 20 and ds.split("test").keys[0] == "s0000000000"
    assert list((tmp_path / "scratch").iterdir()) == []  # the finishing rank's scratch is gone


def test_remote_dataset_is_checked_before_anything_is_written(models, tmp_path, capsys, monkeypatch) -> None:
    from cifar5m.core.errors import ConfigMismatchError

    monkeypatch.setattr("cifar5m.generator.lease.SETTLE", 0.0)
    url = f"memory://cifar5m-test/{tmp_path.name}/ds"
    kw = {"count": 30, "test_count": 10, "shard_size": 20, "steps": 1}
    first = run(config(models, url, **kw), progress=False)
    with pytest.raises(ConfigMismatchError, match=rf"^{url} holds a dataset made with other settings \(seed"):
        run(config(models, url, **{**kw, "seed": 1}), progress=False)
    with pytest.raises(ConfigMismatchError, match=rf"^{url} already holds 30 samples.*--count >= 30"):
        run(config(models, url, **{**kw, "count": 25}), progress=False)
    assert Dataset(url).manifest == first  # the refused runs changed nothing
    capsys.readouterr()
    same = run(config(models, url, **kw), progress=False)
    assert same == first and "nothing to do" in capsys.readouterr().out
    # Extending needs no local copy: the finished shards stay in the store, the last one is redone.
    import sys

    from cifar5m.generator.store import Store

    listed, real_parts = [], Store.parts
    def counted_parts(self, **kw):
        listed.append(sys._getframe(1).f_code.co_name)
        return real_parts(self, **kw)
    monkeypatch.setattr(Store, "parts", counted_parts)
    bigger = run(config(models, url, **{**kw, "count": 50}), progress=False)
    assert listed.count("prepare") == 1 and "reopen_finished" not in listed  # the footers once
    assert Dataset(url).manifest == bigger and sum(s.samples for s in bigger.shards) == 50
    assert [s.samples for s in bigger.shards if s.split == "train"] == [20, 20]
    direct = run(config(models, f"{url}-direct", **{**kw, "count": 50}), progress=False)
    assert bigger.shards == direct.shards


def crash_after(monkeypatch: pytest.MonkeyPatch, shards: int) -> list[str]:
    """Make the next run die (like Ctrl-C) when it starts shard number ``shards + 1``."""
    from cifar5m.generator.producer import Producer

    real_shard, calls = Producer.shard, []

    def crashing(self, plan, **kw):
        calls.append(plan.file)
        if len(calls) == shards + 1:
            monkeypatch.setattr(Producer, "shard", real_shard)
            raise KeyboardInterrupt
        return real_shard(self, plan, **kw)

    monkeypatch.setattr(Producer, "shard", crashing)
    return calls


def test_crash_then_damaged_or_deleted_shards_are_regenerated_on_resume(models, reference, tmp_path,
                                                                       monkeypatch, capsys) -> None:
    out = tmp_path / "ds"
    calls = crash_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(config(models, out, workers=1), progress=False)
    assert not (out / "manifest.json").exists()
    damaged, deleted = out / calls[0], out / calls[1]
    data = bytearray(damaged.read_bytes())
    data[700] ^= 0xFF  # inside the first PNG
    damaged.write_bytes(bytes(data))
    deleted.unlink()  # its _work/ part remains
    run(config(models, out), progress=False)
    printed = capsys.readouterr().out
    assert f"{damaged} does not match its recorded sha256: regenerating it" in printed
    assert f"{deleted} is missing but its _work/ part remains: regenerating it" in printed
    assert dataset_digest(out) == dataset_digest(reference)


def test_resume_hashes_each_kept_shard_once(models, tmp_path, monkeypatch) -> None:
    import cifar5m.shards.shard
    import cifar5m.shards.writer

    out, kw = tmp_path / "ds", {"count": 100, "test_count": 20, "shard_size": 20, "steps": 1}
    calls = crash_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(config(models, out, workers=1, **kw), progress=False)
    hashed: list[str] = []
    for module in (cifar5m.shards.shard, cifar5m.shards.writer):
        real = module.sha256_file
        monkeypatch.setattr(module, "sha256_file", lambda p, _real=real, **k: hashed.append(Path(p).name)
                            or _real(p, **k))
    run(config(models, out, **kw), progress=False)
    tars = sorted(h for h in hashed if h.endswith(".tar"))
    assert tars == sorted(calls[:3])  # the kept shards, once each; new ones hashed in memory


def test_a_failed_rank_stops_rank_0_before_the_manifest(models, tmp_path, monkeypatch) -> None:
    from cifar5m.core.errors import GenerationError
    from cifar5m.generator import rendezvous

    monkeypatch.setattr(rendezvous, "from_env", lambda: rendezvous.Rank(0, 2, 0))
    monkeypatch.setattr(rendezvous, "init", lambda rank: None)
    monkeypatch.setattr(rendezvous, "close", lambda rank: None)
    monkeypatch.setattr(rendezvous, "share", lambda rank, value: value)
    monkeypatch.setattr(rendezvous, "failed_ranks", lambda rank, ok: [1] if ok else [0, 1])
    out = tmp_path / "ds"
    kw = {"count": 60, "test_count": 20, "shard_size": 20, "steps": 1}
    with pytest.raises(GenerationError, match=r"rank\(s\) 1 of 2 failed; re-run the same command"):
        run(config(models, out, **kw), progress=False)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "train-000001.tar"]


def test_other_ranks_read_nothing_before_rank_0_opened_the_output(models, tmp_path, monkeypatch) -> None:
    from cifar5m.core.errors import GenerationError
    from cifar5m.generator import pipeline, rendezvous

    def forbidden(*args, **kw):
        raise AssertionError("rank 1 looked at the output before rank 0 opened it")

    monkeypatch.setattr(rendezvous, "from_env", lambda: rendezvous.Rank(1, 2, 1))
    monkeypatch.setattr(rendezvous, "init", lambda rank: None)
    monkeypatch.setattr(rendezvous, "close", lambda rank: None)
    for name in ("check_existing", "previous_fingerprint", "existing_sizes", "open_output", "begin", "prepare"):
        monkeypatch.setattr(pipeline, name, forbidden)
    said: list = []
    monkeypatch.setattr(rendezvous, "share", lambda rank, value: said.pop(0))
    monkeypatch.setattr(rendezvous, "failed_ranks", lambda rank, ok: [] if ok else [1])
    kw = {"count": 60, "test_count": 20, "shard_size": 20, "steps": 1}
    said.append(("failed", "ConfigMismatchError: other settings"))
    with pytest.raises(GenerationError, match=r"rank 0 stopped before generating \(ConfigMismatchError"):
        run(config(models, tmp_path / "a", **kw), progress=False)
    said.append(("ok", ([], True, None)))  # rank 0: complete already (lock holder not visible here)
    assert run(config(models, tmp_path / "b", **kw), progress=False) is None
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    said.append(("ok", (["test-000000.tar"], False, None)))  # rank 1 owns shard 1 of 3: train-000000
    (tmp_path / "c").mkdir()  # (rank 0 made it)
    assert run(config(models, tmp_path / "c", **kw), progress=False) is None
    assert sorted(p.name for p in (tmp_path / "c").glob("*.tar")) == ["train-000000.tar"]


def test_cli_help_explains_with_examples() -> None:
    from click.testing import CliRunner

    from cifar5m.cli.main import cli as cli_group

    res = CliRunner().invoke(cli_group, ["generate", "--help"])
    assert res.exit_code == 0
    for text in ("Examples:", "torchrun --nproc-per-node 8", "--dry-run", "--min-confidence",
                 "--balance", "--test-count", "--image-format", "--labeler", "--seed"):
        assert text in res.output


def test_fast_cpu_mode_is_valid_and_repeatable_at_equal_batch_size(models, tmp_path) -> None:
    """--fast-cpu (oneDNN, bf16) writes a valid dataset; equal batch size gives equal bytes."""
    from cifar5m.shards.verify import verify_dataset

    kw = {"sampler": "dpmsolver++", "steps": 2, "count": 40, "test_count": 8, "shard_size": 20,
          "exact_cpu": False, "dtype": "bf16", "batch_size": 16}
    run(config(models, tmp_path / "a", **kw), progress=False)
    run(config(models, tmp_path / "b", **kw), progress=False)
    assert verify_dataset(tmp_path / "a", decode=True, progress=False).samples == {"train": 32, "test": 8}
    assert dataset_digest(tmp_path / "a") == dataset_digest(tmp_path / "b")
