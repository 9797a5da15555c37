"""train-generator: exact resume, diffusers-format output, sampling, and the builtin UNet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cifar5m.cli import cli
from cifar5m.errors import ConfigMismatchError
from generator.unet_training import UNetTrainConfig, build_unet, sample_images, train_generator

BUILTIN_UNET = Path(__file__).resolve().parents[1] / "generator" / "builtin" / "unet"


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


def test_builtin_unet_loads_offline_and_generates(monkeypatch) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (BUILTIN_UNET / "config.json").is_file(), "the builtin generator must be committed"
    assert (BUILTIN_UNET / "diffusion_pytorch_model.safetensors").stat().st_size <= 20 * 2**20
    unet = UNet2DModel.from_pretrained(BUILTIN_UNET)
    sched = DDPMScheduler.from_pretrained(BUILTIN_UNET, subfolder="scheduler")
    images = sample_images(unet, dict(sched.config), count=2, steps=3, seed=1, device=torch.device("cpu"))
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 5
