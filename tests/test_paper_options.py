"""The paper's options: stepped cosine, augmentations 0-3, MLP width lists, mCNN, fp32 / bf16."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from cifar5m.core.errors import ModelError
from cifar5m.train.config import TrainConfig
from cifar5m.train.device_augment import PAD, DeviceAugment
from cifar5m.train.models import build_model, count_parameters
from cifar5m.train.trainer import lr_factor, train

torch.set_num_threads(1)
CPU = torch.device("cpu")


def test_stepped_cosine_is_constant_within_k_and_matches_the_papers_levels():
    # the paper's code: CosineAnnealingLR(T_max = T // K) stepped after every K batches
    factors = [lr_factor(s, steps=39_000, schedule="cosine", every=390) for s in range(39_000)]
    assert len(set(factors[:390])) == 1 and factors[0] == 1.0
    assert factors[390] == pytest.approx(0.5 * (1 + math.cos(math.pi / 100)))
    assert len(set(factors)) == 100 and all(len(set(factors[i:i + 390])) == 1 for i in range(0, 39_000, 390))
    assert {lr_factor(s, steps=390, schedule="cosine", every=390) for s in range(390)} == {1.0}
    assert lr_factor(25, steps=100, schedule="cosine", every=1) == lr_factor(25, steps=100, schedule="cosine")


def _draws(seed: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    dy = torch.randint(0, 2 * PAD + 1, (b, 1), generator=g)[:, 0].numpy()
    dx = torch.randint(0, 2 * PAD + 1, (b, 1), generator=g)[:, 0].numpy()
    return dy, dx, (torch.rand(b, generator=g) < 0.5).numpy()


@pytest.mark.parametrize(("mode", "pad"), [("crop-flip", "constant"), ("reflect-crop-flip", "reflect")])
def test_crop_flip_equals_numpy_padding(mode, pad):
    images = torch.randint(1, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = DeviceAugment(mode, seed=5, device=CPU)(images).numpy()
    dy, dx, flip = _draws(5, 16)
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)), mode=pad)
    for i in range(16):
        want = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        np.testing.assert_array_equal(out[i], want[..., ::-1] if flip[i] else want)
    assert ((out == 0).any() if pad == "constant" else not (out == 0).any())  # zero pad vs mirror


def test_flip_only_mirrors_some_images_and_nothing_else():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = DeviceAugment("flip", seed=1, device=CPU)(images)
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54


def test_mlp_width_lists_and_mcnn():
    net = build_model("mlp[128,128,128]")
    assert [m.out_features for m in net if isinstance(m, nn.Linear)] == [128, 128, 128, 10]
    assert [m.out_features for m in build_model("mlp[16,8]") if isinstance(m, nn.Linear)] == [16, 8, 10]
    for bad in ("mlp[16,x]", "mlp[]", "mlp[0]"):
        with pytest.raises(ModelError, match="bad MLP widths"):
            build_model(bad)
    with pytest.raises(ModelError, match="drop --width"):
        build_model("mlp[16]", width=4)
    mcnn = build_model("mcnn")
    assert count_parameters(mcnn) == 1_557_066
    convs = [m.out_channels for m in mcnn.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [64, 128, 256, 512]
    assert build_model("mcnn", width=2)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def _run(data, tmp_path, name, **options):
    settings = dict(data=str(data), world="real", n=64, arch="mlp", width=8, steps=8, batch_size=16,
                    log_every=1, log_dense=(), test_limit=32)
    config = TrainConfig(**{**settings, **options})
    result = train(config, out=tmp_path / name, progress=False)
    return json.loads((tmp_path / name / "config.json").read_text()), result.rows


def test_each_option_is_recorded_and_changes_the_curve(make_dataset, tmp_path):
    data = make_dataset()
    _, base = _run(data, tmp_path, "base")
    options = [{"lr_step_every": 4}, {"augment": "flip"}, {"augment": "crop-flip"},
               {"augment": "reflect-crop-flip"}, {"arch": "mlp[8,8]", "width": None},
               {"arch": "mcnn", "width": 2}, {"precision": "bf16"}]
    curves = []
    for i, option in enumerate(options):
        saved, rows = _run(data, tmp_path, f"opt{i}", **option)
        assert {k: saved[k] for k in option} == option
        assert [r["step"] for r in rows] == [r["step"] for r in base]
        assert [r["test_soft_error"] for r in rows] != [r["test_soft_error"] for r in base], option
        curves.append(rows)
    stepped = [r["lr"] for r in curves[0]]  # K = 4 over T = 8: two levels
    assert stepped[:4] == [0.1] * 4 and stepped[4:8] == [pytest.approx(0.05)] * 4 and stepped[8] < 1e-12
    assert [r["lr"] for r in base][1] < 0.1  # per-step cosine moves from the first step
    augmented = {tuple(r["train_soft_error"] for r in c) for c in curves[1:4]}
    assert len(augmented) == 3  # flip, crop-flip and reflect-crop-flip each train differently
    _, fp32 = _run(data, tmp_path, "fp32", precision="fp32")
    assert [r["test_soft_error"] for r in fp32] == [r["test_soft_error"] for r in base]  # CPU auto = fp32
