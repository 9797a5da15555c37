"""Batch preparation on the training device: augmentation and model input.

Augmentation runs on the device, on the whole uint8 batch at once, with its own
generator, so it is identical in both worlds (the only difference between the
worlds is which samples arrive) and it costs no CPU: at 46k images/s an H200
would need ~10 CPU cores to crop and flip with torchvision per sample.
"""

from __future__ import annotations

import torch

from cifar5m.core.augment import crop_flip
from cifar5m.core.errors import TrainConfigError
from cifar5m.train.config import AUGMENTATIONS

PAD = 4  # random crop 32 from 40 (padding 4), the paper's `--aug 2` and `--aug 3`


class DeviceAugment:
    """Random horizontal flip, optionally after a random crop of the 4-padded ``(B, 3, 32, 32)``
    uint8 batch: zero padding (``crop-flip``) or mirror padding (``reflect-crop-flip``)."""

    def __init__(self, mode: str, *, seed: int, device: torch.device) -> None:
        if mode not in AUGMENTATIONS:
            raise TrainConfigError(f"unknown augmentation {mode!r}; choose one of {AUGMENTATIONS}")
        self.mode = mode
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return images
        b, dev, g = images.shape[0], images.device, self.generator
        if self.mode == "flip":
            flip = torch.rand(b, device=dev, generator=g) < 0.5
            return torch.where(flip[:, None, None, None], images.flip(-1), images)
        dy = torch.randint(0, 2 * PAD + 1, (b, 1), device=dev, generator=g)
        dx = torch.randint(0, 2 * PAD + 1, (b, 1), device=dev, generator=g)
        flip = torch.rand(b, device=dev, generator=g) < 0.5
        return crop_flip(images, dy, dx, flip, pad=PAD,
                         padding="zeros" if self.mode == "crop-flip" else "reflect")

    def state_dict(self) -> dict:
        return {"mode": self.mode, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu() if hasattr(state["generator"], "cpu")
                                 else state["generator"])


def prepare(images: torch.Tensor, *, channels_last: bool) -> torch.Tensor:
    """uint8 ``(B, 3, 32, 32)`` -> float in [-1, 1] (the paper's ``Normalize(0.5, 0.5)``)."""
    x = images.float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
