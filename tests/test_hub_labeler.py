"""Hub classifiers (transformers, timm) as labelers: generate, label, eval-labeler, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cifar5m.cli.main import cli
from cifar5m.core.errors import ModelError
from cifar5m.generator.labeler import load_labeler
from cifar5m.shards.format import CIFAR10_CLASSES
from cifar5m.shards.index import read_index
from cifar5m.shards.manifest import load_manifest
from cifar5m.shards.reader import Dataset
from cifar5m.shards.verify import verify_dataset
from tests.generate_helpers import save_tiny_unet
from tests.labeler_models import save_tiny_timm, save_tiny_vit, timm_usable

pytest.importorskip("transformers")
needs_timm = pytest.mark.skipif(
    not timm_usable(), reason="timm does not import here: it needs a torchvision built for this torch "
                              "(PyPI's torchvision is built against CUDA torch; see docs/labelers.md)")


@pytest.fixture(autouse=True)
def _offline(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    torch.set_num_threads(1)


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_device_preprocessing_matches_the_image_processor() -> None:
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    from cifar5m.generator.labeler_input import from_image_processor

    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for proc in (ViTImageProcessor(size={"height": 48, "width": 48}),  # bilinear
                 ViTImageProcessor(size={"height": 64, "width": 64}, resample=3),  # bicubic
                 ConvNextImageProcessor(size={"shortest_edge": 56}, crop_pct=0.875)):  # resize 64, crop 56
        pre = from_image_processor(proc)
        ref = proc(list(images), return_tensors="pt")["pixel_values"]
        ours = pre.apply(torch.as_tensor(images))
        assert ours.shape == ref.shape
        # PIL rounds to uint8 after resizing: within ~1 level of 255, in normalised units.
        assert (ours - ref).abs().max().item() <= 1.5 / 255 / min(pre.std)


def test_transformers_labeler_maps_id2label_to_cifar10_order(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model_dir = save_tiny_vit(tmp_path / "vit")
    lab = load_labeler(str(model_dir))
    assert lab.class_names == list(CIFAR10_CLASSES) and lab.order == list(range(9, -1, -1))
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    probs = lab.predict(images)
    # The same model run through transformers' own processor, columns reversed by id2label.
    net = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    pixels = AutoImageProcessor.from_pretrained(model_dir)(list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = torch.softmax(net(pixel_values=pixels).logits, 1).numpy()[:, ::-1]
    assert probs.shape == (6, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.allclose(probs, ref, atol=2e-3)
    lab.dtype = torch.bfloat16  # the CUDA default (autocast), run here on the CPU
    assert np.abs(lab.predict(images) - probs).max() < 0.05 and lab.details()["dtype"] == "bf16"
    lab.dtype = None
    details = lab.details()
    assert details["kind"] == "transformers" and details["class_index"]["truck"] == 0
    assert details["preprocessing"]["size"] == (48, 48) and details["preprocessing"]["interpolation"] == "bilinear"


def test_classes_that_are_not_cifar10_are_refused_by_name(tmp_path: Path, make_dataset) -> None:
    names = [n if n not in ("automobile", "truck") else f"LABEL_{i}" for i, n in enumerate(CIFAR10_CLASSES)]
    model_dir = save_tiny_vit(tmp_path / "vit", names=names)
    with pytest.raises(ModelError, match=r"missing \['automobile', 'truck'\]"):
        load_labeler(str(model_dir))
    result = CliRunner().invoke(cli, ["eval-labeler", "--labeler", str(model_dir), str(make_dataset())])
    assert result.exit_code == 1
    assert result.output.startswith("Error: labeler") and "missing ['automobile', 'truck']" in result.output
    assert "Traceback" not in result.output


def test_hub_id_loads_from_the_cache_offline_with_its_revision(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    cache, commit = tmp_path / "hub", "b" * 40
    repo = cache / "models--someone--tiny-vit-cifar10"
    save_tiny_vit(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    lab = load_labeler("someone/tiny-vit-cifar10")
    assert lab.revision == commit and lab.details()["model"] == "someone/tiny-vit-cifar10"
    with pytest.raises(ModelError, match=r"not in the Hub cache \(HF_HUB_OFFLINE is set\)"):
        load_labeler("someone/no-such-model")


def test_generate_with_a_transformers_labeler_records_it(tmp_path: Path) -> None:
    save_tiny_unet(tmp_path / "unet")
    model_dir = save_tiny_vit(tmp_path / "vit")
    out = tmp_path / "gen"
    run("generate", "--count", "12", "--test-count", "2", "--out", str(out), "--model", str(tmp_path / "unet"),
        "--labeler", str(model_dir), "--sampler", "ddim", "--steps", "2", "--batch-size", "6",
        "--shard-size", "5", "--device", "cpu", "--no-compile")
    ds = Dataset(out)
    details = ds.manifest.provenance["labeler_details"]
    assert details["kind"] == "transformers" and details["model"] == str(model_dir.resolve())
    assert details["sha256"] == ds.manifest.provenance["labeler_sha256"] == load_labeler(str(model_dir)).sha256
    assert details["preprocessing"]["mean"] == [0.49, 0.48, 0.45]
    # Stored labels are the labeler's argmax on the stored images.
    split = ds.split("train")
    batch = split.decode_shard(split.shard_files[0])
    assert np.array_equal(load_labeler(str(model_dir)).predict(batch.images).argmax(1), batch.labels)


def test_label_relabels_in_a_new_index_version_without_touching_shards(tmp_path: Path, make_dataset) -> None:
    root = make_dataset(n_train=30, n_test=10, shard_size=16)
    shard_bytes = {p.name: p.read_bytes() for p in root.glob("*.tar")}
    old_labels = read_index(root / "index.parquet")["label"].to_numpy()
    model_dir = save_tiny_vit(tmp_path / "vit")
    out = run("label", str(root), "--labeler", str(model_dir), "--device", "cpu", "--batch-size", "7",
              "--plot", str(tmp_path / "confusion.png"))
    assert "agreement with the previous labels (label_v1)" in out and "airplane" in out
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name: p.read_bytes() for p in root.glob("*.tar")} == shard_bytes
    index = read_index(root / "index.parquet")
    assert np.array_equal(index["label_v1"].to_numpy(), old_labels)
    lab = load_labeler(str(model_dir))
    ds = Dataset(root)
    for split in ("train", "test"):
        part = ds.split(split)
        images = np.concatenate([part.decode_shard(s).images for s in part.shard_files])
        probs = lab.predict(images)
        assert np.array_equal(part.labels, probs.argmax(1))  # readers see the new labels
    new = index["label"].to_numpy()
    meta = json.loads(index.schema.metadata[b"cifar5m.index"])
    assert meta["version"] == 2 and meta["shard_labels"] == "label_v1"
    relabel = load_manifest(root).provenance["relabels"][-1]
    assert relabel["agreement"] == pytest.approx(np.mean(new == old_labels), abs=1e-6)
    matrix = np.asarray(relabel["confusion"])
    assert matrix.sum() == 40 and all(matrix[a, b] >= 1 for a, b in zip(old_labels, new, strict=True))
    assert relabel["labeler"]["kind"] == "transformers"
    assert verify_dataset(root, decode=True, progress=False).decoded == 40  # .cls still match label_v1
    # A second relabel keeps the first one's labels as label_v2; the shards still match label_v1.
    run("label", str(root), "--labeler", str(model_dir), "--device", "cpu")
    meta = json.loads(read_index(root / "index.parquet").schema.metadata[b"cifar5m.index"])
    assert meta["version"] == 3 and meta["shard_labels"] == "label_v1" and "label_v2" in meta["labels"]
    assert verify_dataset(root, decode=True, progress=False).decoded == 40
    result = CliRunner().invoke(cli, ["label", str(root), "--labeler", str(model_dir), "--keep-as", "label_v1"])
    assert result.exit_code == 1 and "already has a column 'label_v1'" in result.output


def test_eval_labeler_prints_accuracy_time_and_rate(tmp_path: Path, make_dataset) -> None:
    root = make_dataset(n_train=10, n_test=20, shard_size=8)
    model_dir = save_tiny_vit(tmp_path / "vit")
    out = run("eval-labeler", "--labeler", str(model_dir), str(root), "--device", "cpu", "--batch-size", "8")
    lab = load_labeler(str(model_dir))
    part = Dataset(root).split("test")
    images = np.concatenate([part.decode_shard(s).images for s in part.shard_files])
    correct = int(np.sum(lab.predict(images).argmax(1) == part.labels))
    assert f"({correct:,} / 20) on test" in out and "img/s on cpu at batch 8" in out


@needs_timm
def test_timm_labeler_generate_label_and_eval(tmp_path: Path, make_dataset) -> None:
    ckpt = save_tiny_timm(tmp_path / "timm")
    spec = f"timm:test_vit:{ckpt}"
    lab = load_labeler(spec)
    assert lab.order == list(range(9, -1, -1)) and lab.details()["preprocessing"]["size"] == (64, 64)
    save_tiny_unet(tmp_path / "unet")
    out = tmp_path / "gen"
    run("generate", "--count", "7", "--test-count", "2", "--out", str(out), "--model", str(tmp_path / "unet"),
        "--labeler", spec, "--sampler", "ddim", "--steps", "1", "--shard-size", "5", "--device", "cpu",
        "--no-compile")
    details = Dataset(out).manifest.provenance["labeler_details"]
    assert details["kind"] == "timm" and details["checkpoint"] == str(ckpt.resolve())
    root = make_dataset(n_train=12, n_test=6, shard_size=8)
    run("label", str(root), "--labeler", spec, "--device", "cpu")
    part = Dataset(root).split("test")
    images = part.decode_shard(part.shard_files[0]).images
    assert np.array_equal(part.labels[: len(images)], lab.predict(images).argmax(1))
    assert "on test of" in run("eval-labeler", "--labeler", spec, str(root), "--device", "cpu")


def test_bad_timm_specs_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="timm:MODEL_NAME:CHECKPOINT"):
        load_labeler("timm:resnet18")
    with pytest.raises(ModelError, match="checkpoint .*missing.safetensors not found"):
        load_labeler(f"timm:resnet18:{tmp_path / 'missing.safetensors'}")


def test_other_commands_never_import_transformers_or_timm(make_dataset, tmp_path: Path) -> None:
    root = make_dataset(n_train=10, n_test=5)
    lab = tmp_path / "lab"
    from tests.generate_helpers import save_tiny_labeler

    save_tiny_labeler(lab)
    code = ("import sys\nfrom click.testing import CliRunner\nfrom cifar5m.cli.main import cli\n"
            f"for args in (['verify', {str(root)!r}], ['info', {str(root)!r}],"
            f" ['eval-labeler', '--labeler', {str(lab)!r}, {str(root)!r}, '--device', 'cpu']):\n"
            "    r = CliRunner().invoke(cli, args)\n    assert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in ('transformers', 'timm', 'torchvision') if m in sys.modules))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_label_resumes_from_saved_shard_probabilities(tmp_path: Path, make_dataset, monkeypatch) -> None:
    from cifar5m.generator import relabel

    root = make_dataset(n_train=20, n_test=4, shard_size=8)
    model_dir = save_tiny_vit(tmp_path / "vit")
    calls: list[str] = []
    real = relabel._shard_probs

    def failing(lab, split, shard, work):
        calls.append(shard)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(lab, split, shard, work)

    monkeypatch.setattr(relabel, "_shard_probs", failing)
    with pytest.raises(KeyboardInterrupt):
        relabel.label_dataset(root, str(model_dir), keep_as="label_v1", progress=False)
    saved = sorted(p.name for p in (root / relabel.WORK).rglob("*.npy"))
    assert len(saved) == 2 and "label_v1" not in read_index(root / "index.parquet").column_names
    monkeypatch.setattr(relabel, "_shard_probs", real)
    predicted: list[int] = []
    monkeypatch.setattr(type(load_labeler(str(model_dir))), "predict",
                        lambda self, images, **kw: predicted.append(len(images)) or np.full(
                            (len(images), 10), 0.1, np.float32))
    relabel.label_dataset(root, str(model_dir), keep_as="label_v1", progress=False)
    assert sum(predicted) == 24 - 16  # the two finished shards were not labelled again
    assert not (root / relabel.WORK).exists()


@needs_timm
def test_timm_preprocessing_matches_timms_eval_transform() -> None:
    import timm
    from PIL import Image

    from cifar5m.generator.labeler_input import from_timm_data_config

    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for name in ("test_vit", "test_resnet"):  # bicubic, crop_pct 0.95 (odd crop margin: rounded)
        cfg = timm.data.resolve_model_data_config(timm.create_model(name, pretrained=False))
        transform = timm.data.create_transform(**cfg, is_training=False)
        ref = torch.stack([transform(Image.fromarray(i)) for i in images])
        ours = from_timm_data_config(cfg).apply(torch.as_tensor(images))
        assert (ours - ref).abs().max().item() <= 1.5 / 255 / min(cfg["std"])


def test_a_crash_between_index_and_manifest_is_finished_by_the_next_run(tmp_path, make_dataset,
                                                                        monkeypatch) -> None:
    from cifar5m.shards import label_columns

    root = make_dataset(n_train=12, n_test=4, shard_size=8)
    model_dir = save_tiny_vit(tmp_path / "vit")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # after the index rename, before the manifest's

    monkeypatch.setattr(label_columns, "write_manifest", killed)
    from cifar5m.generator.relabel import label_dataset

    with pytest.raises(KeyboardInterrupt):
        label_dataset(root, str(model_dir), keep_as="label_v1", progress=False)
    with pytest.raises(Exception, match="index.parquet has .* the manifest says"):
        verify_dataset(root, progress=False)  # the index no longer matches the manifest
    monkeypatch.undo()
    out = run("label", str(root), "--labeler", str(model_dir))  # the same command again
    assert "agreement with the previous labels (label_v1)" in out
    index = read_index(root / "index.parquet")
    assert json.loads(index.schema.metadata[b"cifar5m.index"])["version"] == 2  # not relabelled twice
    assert len(load_manifest(root).provenance["relabels"]) == 1
    assert verify_dataset(root, decode=True, progress=False).decoded == 16
