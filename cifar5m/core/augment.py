"""The batched random crop + horizontal flip both trainers use (``cifar5m.train.device_augment`` for the
classifiers of the Deep Bootstrap, ``cifar5m.generator.training.labeler_recipe`` for the labeler): one gather
over the whole batch on its device, no per-sample Python. The callers draw the offsets and
flips from their own generators, so each keeps its own random stream."""

from __future__ import annotations

import torch
import torch.nn.functional as F

PADDINGS = ("zeros", "reflect")


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, *,
              pad: int, padding: str = "zeros") -> torch.Tensor:
    """Sample ``i`` of the ``(B, C, H, W)`` batch is the ``H x W`` window at ``(dy[i], dx[i])``
    (each in ``[0, 2 * pad]``, shape ``(B, 1)``) of its image padded by ``pad`` on every side,
    mirrored left-right where ``flip[i]``. ``padding``: zeros, or the image mirrored at its
    edges (``np.pad`` "reflect"); the dtype is kept."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    b, c, h, w = images.shape
    dev = images.device
    cols = torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx  # flip folded into the gather
    rows = torch.arange(h, device=dev) + dy
    if padding == "zeros":
        source = F.pad(images, (pad, pad, pad, pad))
    else:  # mirror the padded coordinates back into the image: -k -> k, size-1+k -> size-1-k
        source = images
        rows, cols = _reflect(rows - pad, h), _reflect(cols - pad, w)
    return source[torch.arange(b, device=dev)[:, None, None, None],
                  torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Positions in ``[-pad, size + pad)`` mirrored into ``[0, size)`` (``np.pad`` "reflect")."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)
