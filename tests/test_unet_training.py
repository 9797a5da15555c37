"""train-generator: exact resume, diffusers-format output, sampling, and the builtin UNet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cifar5m.cli.main import cli
from cifar5m.core.errors import ConfigMismatchError, TrainConfigError
from cifar5m.generator.training.unet import (
    UNetTrainConfig,
    build_unet,
    sample_images,
    train_generator,
)

BUILTIN_UNET = Path(__file__).resolve().parents[1] / "cifar5m" / "generator" / "builtin" / "unet"


def _cfg(data: Path, out: Path, **kw) -> UNetTrainConfig:
    base = dict(data=str(data), out=str(out), block_out_channels=(8, 16), layers_per_block=1,
                attention_levels=(1,), norm_num_groups=4, dropout=0.1, batch_size=8, warmup_steps=2,
                steps=5, checkpoint_every=2, sample_every=4, sample_count=4, sample_steps=2, ema_decay=0.9,
                num_train_timesteps=50)
    return UNetTrainConfig(**{**base, **kw})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "diffusion_pytorch_model.safetensors"))


def test_default_config_is_ho_et_al() -> None:
    with torch.device("meta"):  # count parameters without initialising 35.7M weights
        unet = build_unet(UNetTrainConfig(data="-", out="-"))
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307
    assert unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")


def test_resume_after_kill_equals_uninterrupted(make_dataset, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = make_dataset(n_train=40, n_test=10)
    straight = train_generator(_cfg(data, tmp_path / "a"), device="cpu", progress=False)
    assert straight["steps"] == 5
    assert train_generator(_cfg(data, tmp_path / "b"), device="cpu", stop_after=3, progress=False) == {"stopped_at": 3}
    assert not (tmp_path / "b").exists()
    train_generator(_cfg(data, tmp_path / "b"), device="cpu", progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a-work" / "samples" / "step_0000004.png").is_file()
    assert (tmp_path / "a" / "sample_grid.png").is_file()
    with pytest.raises(ConfigMismatchError, match="other settings"):
        train_generator(_cfg(data, tmp_path / "b", lr=1.0), device="cpu", progress=False)


def test_saved_model_loads_with_from_pretrained(make_dataset, tmp_path: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    data = make_dataset(n_train=20, n_test=10)
    train_generator(_cfg(data, tmp_path / "m", steps=1, sample_every=0), device="cpu", progress=False)
    unet = UNet2DModel.from_pretrained(tmp_path / "m")
    sched = DDPMScheduler.from_pretrained(tmp_path / "m")
    sub = DDPMScheduler.from_pretrained(tmp_path / "m", subfolder="scheduler")
    assert sched.config.num_train_timesteps == sub.config.num_train_timesteps == 50
    assert json.loads((tmp_path / "m" / "train_config.json").read_text())["block_out_channels"] == [8, 16]
    images = sample_images(unet, dict(sched.config), count=3, steps=2, seed=0, device=torch.device("cpu"))
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8


def test_cli_train_generator(make_dataset, tmp_path: Path) -> None:
    data = make_dataset(n_train=20, n_test=10)
    result = CliRunner().invoke(cli, [
        "train-generator", str(data), "--out", str(tmp_path / "g"), "--channels", "8,16",
        "--layers-per-block", "1", "--attention-levels", "", "--norm-groups", "4", "--batch-size", "4",
        "--steps", "2", "--sample-every", "0", "--timesteps", "20", "--sample-steps", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output and (tmp_path / "g" / "config.json").is_file()


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(make_dataset, tmp_path: Path, monkeypatch) -> None:
    # 3 ranks used to take 8 // 3 = 2 images each: a global batch of 6 where 8 was asked
    monkeypatch.setenv("WORLD_SIZE", "3")
    data = make_dataset(n_train=20, n_test=10)
    with pytest.raises(TrainConfigError, match=r"--batch-size 8 does not split evenly over 3 torchrun processes"):
        train_generator(_cfg(data, tmp_path / "g"), device="cpu", progress=False)
    assert not torch.distributed.is_initialized()  # refused before any rank waited for the others


def test_builtin_unet_loads_offline_and_generates(monkeypatch) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (BUILTIN_UNET / "config.json").is_file(), "the builtin generator must be committed"
    assert (BUILTIN_UNET / "diffusion_pytorch_model.safetensors").stat().st_size <= 20 * 2**20
    unet = UNet2DModel.from_pretrained(BUILTIN_UNET)
    sched = DDPMScheduler.from_pretrained(BUILTIN_UNET, subfolder="scheduler")
    images = sample_images(unet, dict(sched.config), count=2, steps=3, seed=1, device=torch.device("cpu"))
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 5


# Run by torchrun on each rank: records every batch the rank trained on and, at exit (click's
# standalone mode ends with sys.exit), the rank's own UNet and EMA weights.
RECORD_RANK = """
import atexit, os, sys
import torch
from cifar5m.generator.training import unet as ut
record, trainers, batches = sys.argv[1], [], []
init, batch = ut._Trainer.__init__, ut._Trainer.batch
def recording_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    trainers.append(self)
def recording_batch(self):
    drawn = batch(self)
    batches.append((self.step, drawn[0].clone(), self.x.clone()))
    return drawn
ut._Trainer.__init__, ut._Trainer.batch = recording_init, recording_batch
def dump():
    tr = trainers[0]
    names = [n for n, _ in tr.unet.named_parameters()]
    torch.save({"batches": batches, "unet": tr.unet.state_dict(), "ema": dict(zip(names, tr.ema))},
               f"{record}/rank{os.environ['RANK']}.pt")
atexit.register(dump)
from cifar5m.cli.main import main
main(sys.argv[2:])
"""


def _drawn_indices(x0: torch.Tensor, x: torch.Tensor) -> list[int]:
    """Which train images a batch holds (each possibly flipped): synthetic images are unique."""
    images = x.float() / 127.5 - 1
    found = []
    for row in x0:
        hits = [i for i in range(len(images)) if torch.equal(row, images[i]) or torch.equal(row, images[i].flip(2))]
        assert len(hits) == 1
        found.append(hits[0])
    return found


@pytest.mark.slow  # 13-34 s on the shared 2 cores: torchrun + diffusers imported by both ranks
def test_torchrun_two_ranks_train_one_model_on_their_own_halves(make_dataset, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    data = make_dataset(n_train=40, n_test=10)
    out, record = tmp_path / "g", tmp_path / "record"
    record.mkdir()
    args = ["train-generator", str(data), "--out", str(out), "--channels", "8,16", "--layers-per-block", "1",
            "--attention-levels", "1", "--norm-groups", "4", "--batch-size", "8", "--warmup", "2",
            "--steps", "3", "--checkpoint-every", "2", "--sample-every", "0", "--sample-steps", "1",
            "--timesteps", "50", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(  # --standalone: a free rendezvous port, no clash with other runs
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--no-python", sys.executable, "-c", RECORD_RANK, str(record), *args],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(record / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r in ranks:  # every rank: one batch of 8 / 2 a step
        assert [step for step, _, _ in r["batches"]] == [0, 1, 2]
        assert all(x0.shape == (4, 3, 32, 32) for _, x0, _ in r["batches"])
    for (_, a, x), (_, b, _) in zip(ranks[0]["batches"], ranks[1]["batches"], strict=True):
        assert not torch.equal(a, b)  # each rank its own half of the global batch...
        assert _drawn_indices(a, x) != _drawn_indices(b, x)  # ...drawn from its own stream
    # DDP kept the ranks in step: the same weights on both, and rank 0 saved what both hold.
    assert all(torch.equal(ranks[0]["unet"][k], ranks[1]["unet"][k]) for k in ranks[0]["unet"])
    saved = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == ranks[1]["ema"].keys()
    assert all(torch.equal(saved[k], ranks[1]["ema"][k]) for k in saved)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3 and metrics["images_seen"] == 24
    assert list(UNet2DModel.from_pretrained(out).config.block_out_channels) == [8, 16]
    assert torch.load(tmp_path / "g-work" / "checkpoint.pt", weights_only=False)["step"] == 3
