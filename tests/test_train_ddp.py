"""DDP under torchrun (2 CPU processes, gloo): the same samples as one process, rank 0 logs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cifar5m.train.config import TrainConfig
from cifar5m.train.metrics import read_rows
from cifar5m.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 5, 16


def config(data: Path, world: str) -> TrainConfig:
    return TrainConfig(data=str(data), world=world, n=40, arch="mlp", width=8, steps=STEPS,
                       batch_size=BATCH, log_every=2, log_dense=(), checkpoint_every=2,
                       record_keys=True, device="cpu")


def keys_per_step(run: Path, ranks: int) -> list[list[str]]:
    """The keys each global step trained on, over all ranks, sorted."""
    per_rank = [(run / f"keys-rank{r}.txt").read_text().splitlines() for r in range(ranks)]
    assert all(len(lines) == STEPS for lines in per_rank)
    steps = []
    for lines in zip(*per_rank, strict=True):
        rank_keys = [line.split() for line in lines]
        assert all(len(k) == BATCH // ranks for k in rank_keys)
        steps.append(sorted(k for keys in rank_keys for k in keys))
    return steps


@pytest.mark.slow
def test_two_process_torchrun_sees_the_same_samples_as_one_process(make_dataset, tmp_path):
    data = make_dataset()
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import torch
        torch.set_num_threads(1)
        from pathlib import Path
        from test_train_ddp import config
        from cifar5m.train.trainer import train
        for world in ("real", "ideal"):
            train(config(Path({str(data)!r}), world), out=Path({str(tmp_path)!r}) / f"ddp-{{world}}",
                  progress=False)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # 2 cores shared by ~6 jobs in CI
    assert done.returncode == 0, done.stderr[-3000:]
    torch.set_num_threads(1)
    for world in ("real", "ideal"):
        single = train(config(data, world), out=tmp_path / f"one-{world}", progress=False)
        ddp = tmp_path / f"ddp-{world}"
        steps = keys_per_step(ddp, 2)
        assert steps == keys_per_step(tmp_path / f"one-{world}", 1)
        if world == "ideal":  # fresh samples: no key twice, over both ranks and all steps
            flat = [k for keys in steps for k in keys]
            assert len(set(flat)) == len(flat) == STEPS * BATCH
        rows = read_rows(ddp / "metrics.jsonl")  # written by rank 0 alone: one row per point
        assert [r["step"] for r in rows] == [r["step"] for r in single.rows] == [0, 2, 4, 5]
        # Step 0 evaluates the same initial weights, each rank on half of the test set.
        assert rows[0]["test_soft_error"] == pytest.approx(single.rows[0]["test_soft_error"], rel=1e-6)
        state = torch.load(ddp / "checkpoint.pt", weights_only=False)
        assert state["step"] == STEPS and len(state["ranks"]) == 2
