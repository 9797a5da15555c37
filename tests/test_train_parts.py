"""Models, metrics, log schedule and augmentation of the trainer (no data stream)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cifar5m.core.errors import ModelError, TrainConfigError
from cifar5m.train.config import TrainConfig, parse_dense
from cifar5m.train.device_augment import DeviceAugment, prepare
from cifar5m.train.metrics import MetricsLog, evaluate, log_points, read_rows
from cifar5m.train.models import MODELS, build_model, count_parameters, register
from cifar5m.train.trainer import lr_factor

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_maps_images_to_logits(name):
    model = build_model(name, width=8, num_classes=7)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 7)


def test_paper_sizes():
    assert count_parameters(build_model("preresnet18")) == 11_171_146  # the paper's preresnet18
    mlp = build_model("mlp")
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [2048, 2048, 2048, 10]


def test_adding_a_model_is_one_function():
    @register("linear-test")
    def linear(*, num_classes=10, width=None):
        return nn.Sequential(nn.Flatten(), nn.Linear(3072, num_classes))

    try:
        assert build_model("linear-test")(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    finally:
        del MODELS["linear-test"]


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ModelError, match="preresnet18"):
        build_model("resnet1000")


def test_log_points_follow_the_paper_schedule():
    points = log_points(39_000)
    assert points[:4] == [0, 4, 8, 12]
    assert [p for p in points if 1020 <= p <= 1040] == [1020, 1024, 1032, 1040]
    assert [p for p in points if 2040 <= p <= 2200] == [2040, 2048, 2112, 2176]
    assert points[-2:] == [38976, 39000]
    # 256 + 128 early points, then every 64 up to 39,000.
    assert len(points) == 256 + 128 + (39_000 - 2048) // 64 + 1 + 1
    assert log_points(10, every=4, dense=()) == [0, 4, 8, 10]


def test_parse_dense():
    assert parse_dense("1024:4,2048:8") == ((1024, 4), (2048, 8))
    assert parse_dense("none") == ()


def test_soft_error_is_mean_of_one_minus_p_true():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    labels = torch.tensor([0, 0, 1])

    class Fixed(nn.Module):
        def forward(self, x):
            return logits[x.long()]  # the "image" is the row's index

    m = evaluate(Fixed(), torch.arange(3), labels, prepare=lambda x: x, batch_size=2)
    p = torch.softmax(logits, 1)[torch.arange(3), labels]
    assert m["soft_error"] == pytest.approx(float((1 - p).mean()))
    assert m["error"] == pytest.approx(2 / 3)  # ties go to class 0
    assert m["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, labels)))


def test_metrics_log_truncates_to_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (0, 4, 8):
        log.append({"step": step, "test_soft_error": 0.5})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "te')  # torn line of a killed run
    again = MetricsLog(tmp_path)
    again.resume(4)
    assert [r["step"] for r in read_rows(tmp_path / "metrics.jsonl")] == [0, 4]
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,test_soft_error", "0,0.5", "4,0.5"]


def test_cosine_schedule_ends_at_zero():
    assert lr_factor(0, steps=100, schedule="cosine") == 1.0
    assert lr_factor(50, steps=100, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(100, steps=100, schedule="cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(7, steps=100, schedule="constant") == 1.0
    assert math.isclose(lr_factor(25, steps=100, schedule="cosine"), 0.5 * (1 + math.cos(math.pi / 4)))


def test_crop_flip_moves_pixels_and_is_reproducible():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    a = DeviceAugment("crop-flip", seed=3, device=CPU)
    b = DeviceAugment("crop-flip", seed=3, device=CPU)
    b.load_state_dict(a.state_dict())
    out = a(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, b(images))
    assert not torch.equal(out, images)
    # Every output is a shifted (maybe mirrored) window of its zero-padded input.
    padded = nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(8):
        windows = [padded[i, :, y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    assert torch.equal(DeviceAugment("none", seed=0, device=CPU)(images), images)


def test_prepare_scales_to_minus_one_one():
    x = prepare(torch.tensor([0, 255], dtype=torch.uint8).view(1, 2, 1, 1).expand(1, 2, 2, 2),
                channels_last=True)
    assert x.min() == -1 and x.max() == 1 and x.is_contiguous(memory_format=torch.channels_last)


def test_config_rejects_bad_values_with_the_reason():
    with pytest.raises(TrainConfigError, match="--n"):
        TrainConfig(data="x", world="real")
    with pytest.raises(TrainConfigError, match="augment"):
        TrainConfig(data="x", augment="mixup")
    c = TrainConfig(data="x", world="real", n=5)
    assert TrainConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize("padding", ["zeros", "reflect"])
def test_crop_flip_is_a_window_of_the_padded_image(padding):
    """The shared gather (train's DeviceAugment and the labeler's augment) against F.pad."""
    from cifar5m.core.augment import crop_flip

    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    dy, dx = torch.tensor([[0], [1], [2], [3], [4], [2]]), torch.tensor([[4], [3], [2], [1], [0], [2]])
    flip = torch.tensor([False, True, False, True, False, True])
    padded = torch.nn.functional.pad(images.float(), (2, 2, 2, 2), mode="constant" if padding == "zeros" else "reflect")
    got = crop_flip(images, dy, dx, flip, pad=2, padding=padding)
    assert got.dtype == torch.uint8
    for i in range(6):
        window = padded[i, :, dy[i, 0] : dy[i, 0] + 8, dx[i, 0] : dx[i, 0] + 8]
        torch.testing.assert_close(got[i].float(), window.flip(-1) if flip[i] else window)
    with pytest.raises(ValueError, match="padding must be one of"):
        crop_flip(images, dy, dx, flip, pad=2, padding="edge")
