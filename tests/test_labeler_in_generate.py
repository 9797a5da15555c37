"""What the trainers write is what `generate` reads: a trained UNet and labeler make a dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from cifar5m.cli.main import cli
from cifar5m.generator.labeler import load_labeler
from cifar5m.generator.training.labeler_recipe import LabelerTrainConfig, train_labeler
from cifar5m.generator.training.unet import UNetTrainConfig, train_generator
from cifar5m.shards.reader import Dataset


def test_trained_models_drive_generate(make_dataset, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = make_dataset(n_train=40, n_test=20)
    train_labeler(LabelerTrainConfig(data=str(data), out=str(tmp_path / "lab"), arch="tiny", epochs=1,
                                     batch_size=16), device="cpu", progress=False)
    train_generator(UNetTrainConfig(data=str(data), out=str(tmp_path / "unet"), block_out_channels=(8, 16),
                                    layers_per_block=1, attention_levels=(), norm_num_groups=4, batch_size=4,
                                    steps=1, sample_every=0, sample_steps=1, num_train_timesteps=20),
                    device="cpu", progress=False)
    out = tmp_path / "gen"
    result = CliRunner().invoke(cli, ["generate", "--count", "12", "--test-count", "2", "--out", str(out),
                                      "--model", str(tmp_path / "unet"), "--labeler", str(tmp_path / "lab"),
                                      "--sampler", "ddim", "--steps", "2", "--batch-size", "6",
                                      "--shard-size", "5", "--device", "cpu", "--no-compile"])
    assert result.exit_code == 0, result.output
    ds = Dataset(out)
    assert len(ds.split("train")) == 10 and len(ds.split("test")) == 2
    conf = np.asarray(ds.index["confidence"].to_pylist(), dtype=float)
    assert np.all((conf > 0) & (conf <= 1))
    # The labels are the labeler's argmax on the stored images.
    lab = load_labeler(tmp_path / "lab")
    batch = ds.split("train").decode_shard(ds.split("train").shard_files[0])
    assert np.array_equal(lab.predict(batch.images).argmax(1), batch.labels)
