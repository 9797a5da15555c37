"""The labeler format: a small CIFAR classifier that labels generated images.

A labeler is a directory::

    labeler.json        {"format": "cifar5m-labeler", "version": 1, "arch", "arch_kwargs",
                         "class_names", "normalization": {"mean", "std"}, "metrics"}
    model.safetensors   the network's state dict (weights and BatchNorm statistics)

>>> lab = load_labeler("builtin")                        # doctest: +SKIP
>>> probs = lab.predict(images_uint8_nhwc)               # (N, 10) float32, rows sum to 1
>>> feats = lab.features(images_uint8_nhwc)              # (N, D) penultimate features

Architectures are registered by name in ``ARCHS`` so a saved labeler is rebuilt from
JSON alone; nothing is unpickled.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar5m.core.errors import ModelError
from cifar5m.generator.hub_labeler import is_external, load_external
from cifar5m.generator.training import replace_dir
from cifar5m.shards.shard import sha256_file

FORMAT_NAME = "cifar5m-labeler"
FORMAT_VERSION = 1
CONFIG_NAME = "labeler.json"
WEIGHTS_NAME = "model.safetensors"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin" / "labeler"
# Per-channel statistics of CIFAR-10 train images in [0, 1]; the usual values.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Images per forward pass in predict/features: ~25 MB of activations for "airbench".
_CHUNK = 1024


# --- architectures ------------------------------------------------------------------


class ConvGroup(nn.Module):
    """conv -> maxpool 2 -> BN -> GELU -> conv -> BN -> GELU (airbench's block)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(c_out, momentum=0.4)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out, momentum=0.4)
        self.act = nn.GELU()
        for conv in (self.conv1, self.conv2):  # identity (dirac) init of the first in-channels
            nn.init.dirac_(conv.weight[: conv.in_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """airbench94-style net: frozen 2x2 patch-whitening conv, three conv groups, max pool.

    ``widths=(64, 256, 256)`` is airbench94 (~2M params, ~0.24 GFLOP/image fwd); the
    CPU-trained builtin uses narrower widths. The whitening weights are set from data by
    ``init_whitening`` (eigenvectors of the 2x2-patch covariance, with their negations).
    """

    def __init__(self, widths: Sequence[int] = (64, 256, 256), num_classes: int = 10,
                 logit_scale: float = 1 / 9) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.act = nn.GELU()
        chans = [24, *widths]
        self.groups = nn.Sequential(*[ConvGroup(a, b) for a, b in itertools.pairwise(chans)])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(chans[-1], num_classes, bias=False)
        self.logit_scale = logit_scale
        for m in self.modules():  # airbench: BN affine weights off (scale fixed at 1)
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)

    @torch.no_grad()
    def init_whitening(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first conv to whiten 2x2 patches of ``x`` (normalised NCHW float)."""
        patches = x.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 3, 2, 2).float()
        flat = patches.reshape(len(patches), -1)
        flat = flat - flat.mean(0)
        cov = flat.T @ flat / len(flat)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        w = (eigvecs.T / torch.sqrt(eigvals + eps)[:, None]).reshape(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([w, -w]))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.groups(self.act(self.whiten(x)))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)) * self.logit_scale


class TinyNet(nn.Module):
    """A few-thousand-parameter net for tests (fast, not accurate)."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHS: dict[str, Callable[..., nn.Module]] = {"airbench": AirbenchNet, "tiny": TinyNet}


def build_net(arch: str, arch_kwargs: dict[str, Any], *, where: str = "labeler") -> nn.Module:
    if arch not in ARCHS:
        raise ModelError(f"{where}: unknown labeler architecture {arch!r}; known: {sorted(ARCHS)}")
    try:
        return ARCHS[arch](**arch_kwargs)
    except TypeError as exc:
        raise ModelError(f"{where}: bad arch_kwargs for {arch!r}: {exc}") from None


# --- the wrapper --------------------------------------------------------------------


class Labeler(nn.Module):
    """A classifier plus its input normalisation, class names and weights hash."""

    def __init__(self, net: nn.Module, *, arch: str, arch_kwargs: dict[str, Any],
                 class_names: Sequence[str], mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD, sha256: str = "",
                 metrics: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.net = net
        self.arch, self.arch_kwargs = arch, dict(arch_kwargs)
        self.class_names = list(class_names)
        self.sha256 = sha256
        self.metrics = dict(metrics or {})
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (NHWC or NCHW, numpy or torch) -> normalised float NCHW on our device.

        Float input is taken as already scaled to [0, 1].
        """
        x = torch.as_tensor(images)
        if x.ndim != 4 or 3 not in (x.shape[1], x.shape[3]):
            raise ValueError(f"expected images of shape (N,32,32,3) or (N,3,32,32), got {tuple(x.shape)}")
        if x.shape[1] != 3:  # NHWC -> NCHW
            x = x.permute(0, 3, 1, 2)
        x = x.to(self.device, non_blocking=True)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for already-preprocessed input (see ``preprocess``)."""
        return self.net(x)

    def details(self) -> dict[str, Any]:
        """What a manifest records about this labeler."""
        return {"kind": "cifar5m", "arch": self.arch, "arch_kwargs": self.arch_kwargs,
                "sha256": self.sha256, "normalization": {"mean": self.mean.flatten().tolist(),
                                                         "std": self.std.flatten().tolist()},
                "tta": "flip"}

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, *, tta: bool = True) -> np.ndarray | torch.Tensor:
        """Class probabilities, float32 (N, num_classes); numpy in -> numpy out.

        ``tta`` averages the logits of the image and its mirror image (airbench's test-time
        augmentation; +0.5-1 point of accuracy for 2x the cost, still tiny next to the UNet).
        """
        was_training = self.training
        self.eval()
        out = []
        for a in range(0, len(images), _CHUNK):
            x = self.preprocess(images[a : a + _CHUNK])
            logits = self.net(x)
            if tta:
                logits = (logits + self.net(x.flip(3))) / 2
            out.append(torch.softmax(logits.float(), dim=1))
        self.train(was_training)
        probs = torch.cat(out) if out else torch.empty(0, self.num_classes, device=self.device)
        return probs.cpu().numpy() if isinstance(images, np.ndarray) else probs

    @torch.no_grad()
    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Penultimate features (N, D), float32; numpy in -> numpy out."""
        was_training = self.training
        self.eval()
        out = [self.net.features(self.preprocess(images[a : a + _CHUNK])).float()
               for a in range(0, len(images), _CHUNK)]
        self.train(was_training)
        feats = torch.cat(out)
        return feats.cpu().numpy() if isinstance(images, np.ndarray) else feats


# --- save / load --------------------------------------------------------------------


def save_labeler(model: nn.Module, path: str | Path, *, arch: str, arch_kwargs: dict[str, Any],
                 class_names: Sequence[str], metrics: dict[str, Any] | None = None,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD) -> Path:
    """Write ``model`` (a ``Labeler`` or a bare net from ``ARCHS``) as a labeler dir, atomically.

    The directory is built beside ``path`` and renamed into place, so a reader sees the
    old labeler or the new one, never half of one.
    """
    from safetensors.torch import save_file

    net = model.net if isinstance(model, Labeler) else model
    if arch not in ARCHS:
        raise ModelError(f"{path}: unknown labeler architecture {arch!r}; known: {sorted(ARCHS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "arch": arch, "arch_kwargs": arch_kwargs,
        "class_names": list(class_names),
        "normalization": {"mean": list(mean), "std": list(std), "input": "RGB uint8 / 255"},
        "metrics": metrics or {},
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT_NAME})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a labeler is meant to be shared
        (tmp / WEIGHTS_NAME).chmod(0o644)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def resolve_labeler_path(path: str | Path) -> Path:
    return BUILTIN_DIR if str(path) == "builtin" else Path(path)


def read_config(path: str | Path) -> dict[str, Any]:
    """The checked ``labeler.json`` of a labeler directory."""
    root = resolve_labeler_path(path)
    cfg_path = root / CONFIG_NAME
    if not cfg_path.is_file():
        hint = " (the builtin labeler is not trained yet; run `cifar5m train-labeler`)" if root == BUILTIN_DIR else ""
        raise ModelError(f"{cfg_path} not found: {root} is not a labeler directory{hint}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT_NAME:
        raise ModelError(f"{cfg_path} is not a {FORMAT_NAME} config (format={cfg.get('format') if isinstance(cfg, dict) else None!r})")
    if cfg.get("version") != FORMAT_VERSION:
        raise ModelError(f"{cfg_path} has labeler format version {cfg.get('version')!r}; this cifar5m "
                         f"reads version {FORMAT_VERSION}; upgrade cifar5m or retrain the labeler")
    for key in ("arch", "arch_kwargs", "class_names"):
        if key not in cfg:
            raise ModelError(f"{cfg_path} lacks the field {key!r}")
    return cfg


def load_labeler(path: str | Path = "builtin", *, device: str | torch.device = "cpu",
                 class_names: Sequence[str] | None = None) -> Any:
    """Load a labeler directory (or ``"builtin"``) in eval mode on ``device``.

    A transformers model (directory or Hub id) or ``timm:NAME:CHECKPOINT`` gives a
    ``cifar5m.generator.hub_labeler.ExternalLabeler`` instead, its outputs in ``class_names``'
    order (default CIFAR-10's).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if str(path) != "builtin" and is_external(str(path)):
        from cifar5m.shards.format import CIFAR10_CLASSES

        return load_external(str(path), class_names=class_names or CIFAR10_CLASSES, device=device)
    root = resolve_labeler_path(path)
    cfg = read_config(root)
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelError(f"{weights} not found; the labeler directory {root} is incomplete")
    arch_kwargs = dict(cfg["arch_kwargs"])
    arch_kwargs.setdefault("num_classes", len(cfg["class_names"]))
    net = build_net(cfg["arch"], arch_kwargs, where=str(root / CONFIG_NAME))
    try:
        state = load_file(str(weights))
        net.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ModelError(f"{weights} does not fit arch {cfg['arch']!r} {cfg['arch_kwargs']}: {exc}") from None
    norm = cfg.get("normalization", {})
    lab = Labeler(net, arch=cfg["arch"], arch_kwargs=cfg["arch_kwargs"], class_names=cfg["class_names"],
                  mean=norm.get("mean", CIFAR10_MEAN), std=norm.get("std", CIFAR10_STD),
                  sha256=sha256_file(weights), metrics=cfg.get("metrics"))
    return lab.to(device).eval()
