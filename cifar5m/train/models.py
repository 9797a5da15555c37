"""Classifiers for 32x32 RGB images, by name.

The Deep Bootstrap paper (Nakkiran et al., ICLR 2021) compares many architectures;
these are the ones its Figure 1 family uses: the pre-activation ResNet-18 of its code
(``preresnet18``), an MLP with three hidden layers of 2048 and BatchNorm
(``mlp``; any hidden widths as the paper's ``mlp[128,128,128]``), the 4-layer Myrtle-style
CNN of its sweeps (``mcnn``), a ViT with 4x4 patches and VGG-11 with BatchNorm.

Every model takes float input ``(B, 3, 32, 32)`` scaled to [-1, 1] (the paper's
``Normalize(0.5, 0.5)``) and returns logits ``(B, num_classes)``. ``width`` scales a
model (channels of the first stage, hidden units, embedding size) so tests can run
tiny versions of each; ``None`` is the paper's size. Adding a model is one function
decorated with ``@register("name")``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cifar5m.core.errors import ModelError
from cifar5m.train.config import ARCHS, parse_widths

Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator that adds a model builder ``f(*, num_classes, width) -> nn.Module``."""

    def add(builder: Builder) -> Builder:
        MODELS[name] = builder
        return builder

    return add


def build_model(name: str, *, num_classes: int = 10, width: int | None = None) -> nn.Module:
    """A freshly initialised model; raises ``ModelError`` naming the known ones.

    ``mlp[w1,w2,...]`` is an MLP with those hidden widths (the paper's names).
    """
    widths = parse_widths(name)
    if widths is not None:
        if width is not None:
            raise ModelError(f"{name} gives its widths; drop --width")
        return mlp(num_classes=num_classes, widths=widths)
    try:
        builder = MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; choose one of {sorted(MODELS)} "
                         "or mlp[w1,w2,...]") from None
    if width is not None and width < 1:
        raise ModelError(f"model width must be a positive integer, got {width}")
    return builder(num_classes=num_classes, width=width)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- pre-activation ResNet-18 (He et al. 2016, "Identity Mappings"), CIFAR stem ---------


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the 1x1 shortcut (when the shape changes) sees the activated input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


class PreActResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], *, width: int, num_classes: int) -> None:
        super().__init__()
        # 3x3 stride-1 stem and no max-pool: the CIFAR variant (32x32 -> 4x4 after 3 downsamples).
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        layers, cin = [], width
        for i, count in enumerate(blocks):
            cout = width * 2**i
            for j in range(count):
                layers.append(PreActBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        # The paper's code pools straight after the last block (no final BN-ReLU); kept as is.
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register("preresnet18")
def preresnet18(*, num_classes: int = 10, width: int | None = None) -> nn.Module:
    """11.2M parameters at width 64 (the paper's ``preresnet18``)."""
    return PreActResNet((2, 2, 2, 2), width=width or 64, num_classes=num_classes)


# --- MLP -----------------------------------------------------------------------------------


@register("mlp")
def mlp(*, num_classes: int = 10, width: int | None = None,
        widths: tuple[int, ...] | None = None) -> nn.Module:
    """Hidden layers with BatchNorm and ReLU: three of ``width`` (default 2048, the paper's
    ``mlp[2048,2048,2048]``) or the given ``widths``."""
    layers, cin = [nn.Flatten()], 3 * 32 * 32
    for hidden in widths or (width or 2048,) * 3:
        layers += [nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        cin = hidden
    layers.append(nn.Linear(cin, num_classes))
    return nn.Sequential(*layers)


# --- mCNN: the 4-layer Myrtle-style CNN of the paper's sweeps ----------------------------------


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register("mcnn")
def mcnn(*, num_classes: int = 10, width: int | None = None) -> nn.Module:
    """Conv-BN-ReLU of widths k, 2k, 4k, 8k (k = 64), max-pool 2 after the last three,
    a global max-pool and one linear layer (Nakkiran et al.'s ``mCNN``, after Page's
    Myrtle net; 1.56M parameters at k = 64)."""
    k = width or 64
    layers = [*_conv_bn(3, k), *_conv_bn(k, 2 * k), nn.MaxPool2d(2), *_conv_bn(2 * k, 4 * k),
              nn.MaxPool2d(2), *_conv_bn(4 * k, 8 * k), nn.MaxPool2d(2),
              nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * k, num_classes)]
    return nn.Sequential(*layers)


# --- ViT with 4x4 patches (64 tokens + class token), pre-norm transformer ------------------


class ViT(nn.Module):
    def __init__(self, *, dim: int, depth: int, heads: int, patch: int, num_classes: int) -> None:
        super().__init__()
        tokens = (32 // patch) ** 2
        self.embed = nn.Conv2d(3, dim, patch, patch)  # == a linear map of each flattened patch
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.encoder(x)[:, 0]))


@register("vit")
def vit(*, num_classes: int = 10, width: int | None = None) -> nn.Module:
    """Small ViT, patch 4: dim 384, 6 layers, 6 heads (10.7M parameters); width sets dim."""
    dim = width or 384
    heads = 6 if dim % 6 == 0 else 1
    return ViT(dim=dim, depth=6, heads=heads, patch=4, num_classes=num_classes)


# --- VGG-11 with BatchNorm -------------------------------------------------------------------


@register("vgg11_bn")
def vgg11_bn(*, num_classes: int = 10, width: int | None = None) -> nn.Module:
    """VGG-11 ("A") with BatchNorm, CIFAR head (one linear layer on 1x1x8w)."""
    w = width or 64
    plan = [w, "M", 2 * w, "M", 4 * w, 4 * w, "M", 8 * w, 8 * w, "M", 8 * w, 8 * w, "M"]
    layers: list[nn.Module] = []
    cin = 3
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
            cin = item
    layers += [nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


if set(MODELS) != set(ARCHS):  # the list the CLI and the configs check names against, without torch
    raise ImportError(f"cifar5m.train.config.ARCHS {ARCHS} does not list the registered models {sorted(MODELS)}")
