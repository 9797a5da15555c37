"""Preprocessing of an external classifier, run on the device from 32x32 uint8 samples.

A Hub classifier expects what its image processor (transformers) or its data config
(timm) makes of a PIL image: resized (and maybe centre-cropped) to its input size,
rescaled and normalised. ``Preprocessing`` holds those settings and applies them to a
batch of uint8 NHWC tensors with ``torch.nn.functional.interpolate`` on the labeler's
device, so labeling needs no PIL round trip per image. Bilinear and bicubic resizing
use ``antialias=True``, whose kernels are PIL's (bicubic a=-0.5), so the result
matches the processor's PIL path up to its uint8 rounding after the resize.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cifar5m.core.errors import ModelError

# PIL.Image.Resampling values, as image processors store ``resample``.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_MODES = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """uint8 NHWC -> float NCHW: resize, centre crop, rescale, normalise."""

    size: tuple[int, int]  # (height, width) after resizing
    crop: tuple[int, int] | None  # (height, width) of the centre crop, if any
    interpolation: str  # nearest | bilinear | bicubic
    rescale: float  # 1/255 for [0, 1] input
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # where the settings came from (processor class / timm data config)
    # Centre-crop offset of an odd margin: transformers floors it, torchvision (timm) rounds it.
    crop_offset: str = "floor"

    def __post_init__(self) -> None:
        if self.interpolation not in _MODES:
            raise ModelError(f"{self.source}: interpolation {self.interpolation!r} is not supported; "
                             f"supported: {', '.join(_MODES)}")

    @property
    def input_size(self) -> tuple[int, int]:
        return self.crop or self.size

    def apply(self, images: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``images``: uint8 (N, 32, 32, 3) on the target device -> model input of ``dtype``."""
        x = images.permute(0, 3, 1, 2).float() * self.rescale
        if tuple(x.shape[-2:]) != self.size:
            x = self._resize(x)
        if self.crop is not None:
            (h, w), (ch, cw) = self.size, self.crop
            if self.crop_offset == "round":
                top, left = round((h - ch) / 2), round((w - cw) / 2)
            else:
                top, left = (h - ch) // 2, (w - cw) // 2
            x = x[:, :, top : top + ch, left : left + cw]
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return ((x - mean) / std).to(dtype)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolation == "nearest":
            return F.interpolate(x, size=self.size, mode="nearest")
        if self.interpolation == "bilinear":
            return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        # Bicubic overshoots. PIL resizes rows, then columns, clipping to uint8 range after
        # each pass: doing the same keeps us within ~1 level of it (23 levels with one pass).
        top = 255 * self.rescale
        x = F.interpolate(x, size=(x.shape[-2], self.size[1]), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, top)
        return F.interpolate(x, size=self.size, mode="bicubic", align_corners=False,
                             antialias=True).clamp(0, top)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["input"] = "uint8 RGB 32x32, resized on the labeling device (torch interpolate, antialias)"
        return out


def _pair(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ModelError(f"{where}: cannot read a size from {value!r}")


def from_image_processor(proc: Any) -> Preprocessing:
    """The settings of a transformers image processor (ViT, DeiT, ConvNeXt, BiT, ...)."""
    name = getattr(proc, "image_processor_type", None) or type(proc).__name__
    where = f"image processor {name}"
    size: tuple[int, int] = (32, 32)
    crop = None
    if getattr(proc, "do_resize", True):
        spec = dict(proc.size or {})
        if "height" in spec and "width" in spec:
            size = _pair(spec, where)
        elif "shortest_edge" in spec:
            edge = int(spec["shortest_edge"])  # our input is square: shortest edge = both edges
            crop_pct = getattr(proc, "crop_pct", None)
            if crop_pct and "ConvNext" in name and edge < 384:
                # ConvNextImageProcessor: resize to edge/crop_pct, then centre-crop edge.
                size, crop = (int(edge / crop_pct),) * 2, (edge, edge)
            else:
                size = (edge, edge)
        else:
            raise ModelError(f"{where}: unsupported size {spec!r} (need height/width or shortest_edge)")
    if getattr(proc, "do_center_crop", False) and crop is None:
        crop = _pair(proc.crop_size, where)
        if crop[0] > size[0] or crop[1] > size[1]:
            raise ModelError(f"{where}: crop {crop} is larger than the resized image {size}")
    resample = getattr(proc, "resample", 2)
    mode = _PIL_RESAMPLE.get(int(resample) if resample is not None else 2)
    if mode is None:
        raise ModelError(f"{where}: resample={resample!r} is not supported (nearest, bilinear, bicubic)")
    rescale = float(proc.rescale_factor) if getattr(proc, "do_rescale", True) else 1.0
    if getattr(proc, "do_normalize", True):
        mean, std = tuple(map(float, proc.image_mean)), tuple(map(float, proc.image_std))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return Preprocessing(size, crop, mode, rescale, mean, std, source=name)


def from_timm_data_config(cfg: dict[str, Any]) -> Preprocessing:
    """timm's eval transform (``resolve_model_data_config``): resize the shorter side to
    ``input / crop_pct`` (``crop_mode`` center), centre-crop the input size, normalise."""
    _, h, w = cfg["input_size"]
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    mode = cfg.get("crop_mode", "center")
    if mode not in ("center", "squash"):
        raise ModelError(f"timm data config: crop_mode {mode!r} is not supported (center, squash)")
    size = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    crop = None if size == (h, w) else (h, w)
    interp = cfg.get("interpolation", "bilinear")
    return Preprocessing(size, crop, interp, 1 / 255, tuple(map(float, cfg["mean"])),
                         tuple(map(float, cfg["std"])), source="timm data config", crop_offset="round")
