"""The labeler format (save/load/predict), its errors, and train-labeler with resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cifar5m.cli.main import cli
from cifar5m.core.errors import ConfigMismatchError, ModelError
from cifar5m.generator.labeler import ARCHS, BUILTIN_DIR, Labeler, load_labeler, save_labeler
from cifar5m.generator.training.labeler_recipe import LabelerTrainConfig, augment, train_labeler

NAMES = [f"c{i}" for i in range(10)]


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ARCHS["tiny"](width=4)
    path = save_labeler(net, tmp_path / "lab", arch="tiny", arch_kwargs={"width": 4}, class_names=NAMES,
                        metrics={"test_accuracy": 0.5})
    lab = load_labeler(path)
    assert isinstance(lab, Labeler) and lab.num_classes == 10 and lab.class_names == NAMES
    assert lab.sha256 == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    cfg = json.loads((path / "labeler.json").read_text())
    assert cfg["format"] == "cifar5m-labeler" and cfg["version"] == 1 and cfg["metrics"]["test_accuracy"] == 0.5
    x = _images(7)
    probs = lab.predict(x)
    assert probs.dtype == np.float32 and probs.shape == (7, 10)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
    torch.testing.assert_close(lab.predict(nchw), torch.from_numpy(probs))
    net.eval()
    want = torch.softmax((net(lab.preprocess(x)) + net(lab.preprocess(x).flip(3))) / 2, 1)
    np.testing.assert_allclose(probs, want.detach().numpy(), atol=1e-6)
    assert lab.features(x).shape == (7, 8)
    # Saving again replaces the directory atomically (no temp dirs left behind).
    save_labeler(lab, path, arch="tiny", arch_kwargs={"width": 4}, class_names=NAMES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab"]


def test_airbench_whitening_and_features() -> None:
    net = ARCHS["airbench"](widths=(8, 16, 16))
    net.init_whitening(torch.randn(32, 3, 32, 32))
    assert not net.whiten.weight.requires_grad
    torch.testing.assert_close(net.whiten.weight[:12], -net.whiten.weight[12:])
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10) and net.features(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def _saved(tmp_path: Path) -> Path:
    return save_labeler(ARCHS["tiny"](), tmp_path / "lab", arch="tiny", arch_kwargs={}, class_names=NAMES)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda p: (p / "labeler.json").unlink(), "labeler.json not found"),
        (lambda p: (p / "model.safetensors").unlink(), "model.safetensors not found"),
        (lambda p: _edit(p, version=99), "format version 99"),
        (lambda p: _edit(p, format="other"), "not a cifar5m-labeler"),
        (lambda p: _edit(p, arch="resnet9000"), "unknown labeler architecture 'resnet9000'"),
        (lambda p: _edit(p, arch_kwargs={"width": 5}), "does not fit"),
        (lambda p: (p / "labeler.json").write_text("{"), "not valid JSON"),
    ],
)
def test_load_errors_name_the_path(tmp_path: Path, mutate, match: str) -> None:
    path = _saved(tmp_path)
    mutate(path)
    with pytest.raises(ModelError, match=match) as info:
        load_labeler(path)
    assert str(path) in str(info.value)


def _edit(path: Path, **changes) -> None:
    cfg = json.loads((path / "labeler.json").read_text())
    cfg.update(changes)
    (path / "labeler.json").write_text(json.dumps(cfg))


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a labeler directory"):
        load_labeler(tmp_path / "nope")


def test_augment_is_a_crop_and_flip() -> None:
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    same = augment(x, torch.Generator().manual_seed(0), translate=0)
    assert all(torch.equal(same[i], x[i]) or torch.equal(same[i], x[i].flip(2)) for i in range(2))
    moved = augment(x, torch.Generator().manual_seed(1), translate=2)
    assert moved.shape == x.shape


def _cfg(data: Path, out: Path, **kw) -> LabelerTrainConfig:
    base = dict(data=str(data), out=str(out), arch="airbench", widths=(8, 16, 16), epochs=3, batch_size=32,
                checkpoint_every=2, max_test=40)
    return LabelerTrainConfig(**{**base, **kw})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_train_resume_equals_uninterrupted(make_dataset, tmp_path: Path) -> None:
    data = make_dataset(n_train=100, n_test=40)
    torch.set_num_threads(1)
    straight = train_labeler(_cfg(data, tmp_path / "a"), device="cpu", progress=False)
    assert straight["steps"] == 9 and 0 <= straight["test_accuracy"] <= 1
    assert train_labeler(_cfg(data, tmp_path / "b"), device="cpu", stop_after=4, progress=False) == {"stopped_at": 4}
    assert not (tmp_path / "b").exists() and (tmp_path / "b-work" / "checkpoint.pt").is_file()
    resumed = train_labeler(_cfg(data, tmp_path / "b"), device="cpu", progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    lab = load_labeler(tmp_path / "b")
    assert lab.metrics["test_accuracy"] == straight["test_accuracy"] and lab.class_names[0] == "airplane"
    assert json.loads((tmp_path / "b" / "train_config.json").read_text())["widths"] == [8, 16, 16]
    with pytest.raises(ConfigMismatchError, match="other settings"):
        train_labeler(_cfg(data, tmp_path / "b", lr=1.0), device="cpu", progress=False)


def test_cli_train_labeler(make_dataset, tmp_path: Path) -> None:
    data = make_dataset(n_train=64, n_test=20, image_format="npy")
    out = tmp_path / "lab"
    result = CliRunner().invoke(cli, ["train-labeler", str(data), "--out", str(out), "--arch", "tiny",
                                      "--epochs", "1", "--batch-size", "32", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and load_labeler(out).num_classes == 10
    bad = CliRunner().invoke(cli, ["train-labeler", str(tmp_path / "none"), "--out", str(out)])
    assert bad.exit_code == 1 and "Error:" in bad.output


def test_builtin_labeler_loads_offline() -> None:
    assert (BUILTIN_DIR / "labeler.json").is_file(), "the builtin labeler must be committed"
    lab = load_labeler("builtin")
    assert lab.num_classes == 10 and lab.metrics["test_accuracy"] > 0.5
    assert (BUILTIN_DIR / "model.safetensors").stat().st_size <= 5 * 2**20
    probs = lab.predict(_images(4))
    assert probs.shape == (4, 10) and np.all(np.isfinite(probs))


def test_label_holds_the_dataset_lock(make_dataset) -> None:
    from cifar5m.shards.lock import DirectoryLock

    root = make_dataset(n_train=10, n_test=0, shard_size=10)
    index = (root / "index.parquet").read_bytes()
    with DirectoryLock(root, what="labelled"):  # another `cifar5m label` of it, still running
        result = CliRunner().invoke(cli, ["label", str(root), "--labeler", "builtin", "--device", "cpu"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {root} is being labelled in another process"), lines
    assert not (root / "_label_work").exists() and (root / "index.parquet").read_bytes() == index
