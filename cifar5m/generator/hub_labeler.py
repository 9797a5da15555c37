"""Pretrained image classifiers from the Hub (transformers or timm) as labelers.

``--labeler`` takes, next to a cifar5m labeler directory and ``builtin``:

* a transformers image-classification model: a local directory (``save_pretrained``)
  or a Hub id, optionally ``@revision`` (``hf:`` prefix optional, for ids that could be
  mistaken for a path). Hub ids go through ``snapshot_download``, so the Hub cache and
  ``HF_HUB_OFFLINE=1`` are honoured, as for the generator's UNet;
* ``timm:MODEL_NAME:CHECKPOINT``: ``timm.create_model(MODEL_NAME)`` with the weights of
  a checkpoint file (.safetensors / .pth). A ``config.json`` next to it in timm's Hub
  format (``label_names``, ``pretrained_cfg``) gives class names and preprocessing.

The model's class names (``id2label`` / ``label_names``) are mapped to the dataset's
CIFAR-10 order; a model without all of them is refused, naming the missing ones.
Images are resized and normalised on the device (``cifar5m.generator.labeler_input``).
transformers and timm (the ``labelers`` extra) are imported only here, only when
such a labeler is asked for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar5m.core.errors import ModelError
from cifar5m.generator.labeler_input import (
    Preprocessing,
    from_image_processor,
    from_timm_data_config,
)
from cifar5m.generator.model import download_snapshot, sha256_files
from cifar5m.shards.format import CIFAR10_CLASSES

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_WEIGHTS = ("*.safetensors", "*.bin")
_EXTRA = "pip install 'cifar5m[labelers]'"
# Images per forward pass: a ViT-B/16 at 224 px needs ~5 GB of activations at 256 in bf16.
DEFAULT_BATCH = 256


def is_external(spec: str) -> bool:
    """Whether ``spec`` names a transformers or timm labeler rather than a cifar5m one."""
    if spec.startswith(("timm:", "hf:")):
        return True
    path = Path(spec).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file() and not (path / "labeler.json").is_file()
    return not path.exists() and bool(_HUB_ID.match(spec)) and not spec.startswith((".", "~"))


def _norm(name: str) -> str:
    return re.sub(r"[\s_-]+", "", str(name).lower())


def class_map(model_names: Sequence[str], class_names: Sequence[str], *, where: str) -> list[int]:
    """Model output index of each of ``class_names``; refuses missing or extra classes."""
    index = {_norm(n): i for i, n in enumerate(model_names)}
    missing = [c for c in class_names if _norm(c) not in index]
    extra = sorted(set(index) - {_norm(c) for c in class_names})
    if missing or extra or len(model_names) != len(class_names):
        raise ModelError(
            f"{where}: its classes {list(model_names)} do not match the dataset's {len(class_names)} "
            f"classes: missing {missing or 'none'}, extra {extra or 'none'}; use a model fine-tuned "
            f"on CIFAR-10 whose config names its classes (id2label / label_names)")
    return [index[_norm(c)] for c in class_names]


class ExternalLabeler(nn.Module):
    """A Hub classifier behind the ``Labeler`` interface: ``predict`` gives probabilities
    in the dataset's class order; ``sha256`` and ``details()`` go into the manifest."""

    def __init__(self, net: nn.Module, *, kind: str, name: str, preprocessing: Preprocessing,
                 order: Sequence[int], class_names: Sequence[str], sha256: str,
                 revision: str | None = None, versions: dict[str, str] | None = None,
                 dtype: torch.dtype | None = None, batch_size: int = DEFAULT_BATCH) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.kind, self.name, self.revision = kind, name, revision
        self.preprocessing = preprocessing
        self.order = list(order)
        self.class_names = list(class_names)
        self.sha256 = sha256
        self.versions = dict(versions or {})
        self.dtype = dtype
        self.batch_size = batch_size
        self.metrics: dict[str, Any] = {}
        self.info: dict[str, Any] = {}  # kind-specific facts for details() (checkpoint, ...)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _dtype(self) -> torch.dtype:
        return self.dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(pixel_values=x) if self.kind == "transformers" else self.net(x)
        return out.logits if hasattr(out, "logits") else out

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, *, tta: bool = False) -> np.ndarray | torch.Tensor:
        """Class probabilities (N, 10) float32 in the dataset's class order; numpy in -> numpy out.

        ``tta`` averages with the mirror image, as the builtin labeler can (off by default:
        a Hub model's published accuracy is without it).
        """
        dtype = self._dtype()
        order = torch.tensor(self.order, device=self.device)
        out = []
        for a in range(0, len(images), self.batch_size):
            x = torch.as_tensor(images[a : a + self.batch_size]).to(self.device, non_blocking=True)
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"expected uint8 images (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
            x = self.preprocessing.apply(x)
            # bf16 autocast on CUDA (matmuls and convs in bf16, softmax in fp32), fp32 on CPU.
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = self.logits(x).float()
                if tta:
                    logits = (logits + self.logits(x.flip(3)).float()) / 2
            out.append(torch.softmax(logits, dim=1)[:, order])
        probs = torch.cat(out) if out else torch.empty(0, self.num_classes, device=self.device)
        return probs.cpu().numpy() if isinstance(images, np.ndarray) else probs

    def features(self, images: Any) -> Any:
        raise ModelError(f"labeler {self.name!r} ({self.kind}) gives no features for the report's "
                         f"distance; pass a cifar5m labeler (builtin or train-labeler's) to report")

    def details(self) -> dict[str, Any]:
        """What the manifest records: model, revision, hash, class order, preprocessing."""
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self._dtype()]
        return {"kind": self.kind, "model": self.name, "revision": self.revision,
                "sha256": self.sha256, "class_index": dict(zip(self.class_names, self.order, strict=True)),
                "preprocessing": self.preprocessing.to_dict(), "dtype": dtype, "tta": False,
                "versions": self.versions, **self.info}


def _import(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelError(f"this labeler needs {module}, which does not import here ({exc}); "
                         f"install the extra: {_EXTRA}") from None
    except RuntimeError as exc:  # e.g. a torchvision built for another torch
        raise ModelError(f"{module} fails to import next to torch {torch.__version__}: {exc}; "
                         f"install a torchvision built for this torch") from None

def load_transformers(spec: str, *, class_names: Sequence[str] = CIFAR10_CLASSES,
                      device: str | torch.device = "cpu") -> ExternalLabeler:
    """A transformers ``AutoModelForImageClassification`` + its image processor."""
    name = spec.removeprefix("hf:")
    local = Path(name).expanduser()
    if local.is_dir():
        root, revision = local.resolve(), None
    else:
        repo_id, _, rev = name.partition("@")
        root, revision = download_snapshot(repo_id, what="labeler", revision=rev or None)
    weights = sorted(f for pat in _WEIGHTS for f in root.glob(pat))
    weights = [f for f in weights if f.suffix == ".safetensors"] or weights
    if not weights:
        raise ModelError(f"{root} holds no model weights (*.safetensors or *.bin)")
    transformers = _import("transformers")
    transformers.logging.set_verbosity_error()  # the PIL-fallback notice; we do not use its transforms
    transformers.logging.disable_progress_bar()
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(root)
        net = transformers.AutoModelForImageClassification.from_pretrained(root)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{root}: not a transformers image-classification model: {exc}") from None
    id2label = net.config.id2label or {}
    names = [id2label.get(i, id2label.get(str(i), f"LABEL_{i}")) for i in range(net.config.num_labels)]
    order = class_map(names, class_names, where=f"labeler {name!r}")
    return ExternalLabeler(net, kind="transformers", name=name, preprocessing=from_image_processor(proc),
                           order=order, class_names=class_names, sha256=sha256_files(weights),
                           revision=revision, versions={"transformers": transformers.__version__}
                           ).to(device)


def load_timm(spec: str, *, class_names: Sequence[str] = CIFAR10_CLASSES,
              device: str | torch.device = "cpu") -> ExternalLabeler:
    """``timm:MODEL_NAME:CHECKPOINT``: a timm architecture with a checkpoint file's weights."""
    _, model_name, ckpt = [*spec.split(":", 2), "", ""][:3]
    path = Path(ckpt).expanduser()
    if not model_name or not ckpt:
        raise ModelError(f"labeler {spec!r}: write timm:MODEL_NAME:CHECKPOINT "
                         f"(e.g. timm:vit_base_patch16_224:vit-cifar10.safetensors)")
    if not path.is_file():
        raise ModelError(f"labeler {spec!r}: checkpoint {path} not found")
    hub_cfg: dict[str, Any] = {}
    if (path.parent / "config.json").is_file():  # timm's Hub format (push_to_hub / save_for_hf)
        try:
            hub_cfg = json.loads((path.parent / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path.parent / 'config.json'} is not valid JSON: {exc}") from None
    names = hub_cfg.get("label_names") or list(class_names)  # none given: the dataset's order
    timm = _import("timm")
    try:
        net = timm.create_model(model_name, pretrained=False, num_classes=len(names),
                                pretrained_cfg_overlay=hub_cfg.get("pretrained_cfg"))
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ModelError(f"labeler {spec!r}: {exc}") from None
    try:
        timm.models.load_checkpoint(net, str(path), strict=True)
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        raise ModelError(f"{path} does not fit timm model {model_name!r} with {len(names)} classes: "
                         f"{str(exc)[:500]}") from None
    data_cfg = timm.data.resolve_model_data_config(net)
    order = class_map(names, class_names, where=f"labeler {spec!r}")
    lab = ExternalLabeler(net, kind="timm", name=model_name, preprocessing=from_timm_data_config(data_cfg),
                          order=order, class_names=class_names, sha256=sha256_files([path]),
                          versions={"timm": timm.__version__})
    lab.info = {"checkpoint": str(path.resolve()),
                "class_names_from": "config.json label_names" if hub_cfg.get("label_names")
                else "none given: assumed to be the dataset's order"}
    return lab.to(device)


def load_external(spec: str, *, class_names: Sequence[str] = CIFAR10_CLASSES,
                  device: str | torch.device = "cpu") -> ExternalLabeler:
    """Load ``spec`` (see the module docstring) in eval mode on ``device``."""
    if spec.startswith("timm:"):
        return load_timm(spec, class_names=class_names, device=device)
    return load_transformers(spec, class_names=class_names, device=device)
