"""Tiny random Hub classifiers for the labeler tests, saved the way their libraries save them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from cifar5m.shards.format import CIFAR10_CLASSES


def timm_usable() -> bool:
    """timm imports (it needs a torchvision built for this torch; PyPI's is not, for a CPU torch)."""
    try:
        import timm  # noqa: F401
    except Exception:  # ImportError, or torchvision's RuntimeError next to a foreign torch
        return False
    return True


def save_tiny_vit(path: Path, *, names: Sequence[str] = tuple(reversed(CIFAR10_CLASSES)),
                  image_size: int = 48, resample: int = 2, seed: int = 0) -> Path:
    """A ~10k-parameter ViTForImageClassification + ViTImageProcessor (``save_pretrained``);
    its ``id2label`` lists ``names`` (CIFAR-10 reversed by default, to test the mapping)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=image_size, patch_size=8, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=32, num_labels=len(names),
                    id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    ViTForImageClassification(cfg).save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}, resample=resample,
                      image_mean=[0.49, 0.48, 0.45], image_std=[0.25, 0.24, 0.26]).save_pretrained(path)
    return path


def save_tiny_timm(directory: Path, *, names: Sequence[str] = tuple(reversed(CIFAR10_CLASSES)),
                   input_size: int = 64, seed: int = 0) -> Path:
    """timm's ``test_vit`` with a 10-class head: its state dict as safetensors, and a
    ``config.json`` in timm's Hub format (label names, data config). Returns the checkpoint."""
    import timm
    from safetensors.torch import save_file

    data = {"input_size": [3, input_size, input_size], "crop_pct": 1.0, "interpolation": "bilinear",
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    torch.manual_seed(seed)
    # The data config sets the ViT's image size (position embeddings) as well.
    net = timm.create_model("test_vit", pretrained=False, num_classes=len(names), pretrained_cfg_overlay=data)
    directory.mkdir(parents=True, exist_ok=True)
    ckpt = directory / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ckpt))
    cfg = {"architecture": "test_vit", "num_classes": len(names), "label_names": list(names),
           "pretrained_cfg": data}
    (directory / "config.json").write_text(json.dumps(cfg))
    return ckpt
