"""``cifar5m grid``: a PNG of samples, one row per class."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from shards.manifest import atomic_write_bytes
from shards.reader import Dataset

LABEL_WIDTH = 90  # pixels of class-name column at scale 1


def pick_positions(labels: np.ndarray, *, per_class: int, classes: int, seed: int) -> list[list[int]]:
    """Up to ``per_class`` positions of each class, chosen at random by ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(classes):
        pool = np.flatnonzero(labels == c)
        out.append(sorted(rng.choice(pool, size=min(per_class, len(pool)), replace=False).tolist()))
    return out


def render_grid(
    root: str | Path, out: str | Path, *, split: str = "train", per_class: int = 10, scale: int = 2,
    seed: int = 0,
) -> Path:
    """Write a grid PNG of ``split`` (rows = classes, named on the left) to ``out``."""
    dataset = Dataset(root)
    part = dataset.split(split)
    names = dataset.manifest.class_names
    rows = pick_positions(part.labels, per_class=per_class, classes=len(names), seed=seed)
    cell = 32 * scale + 2
    canvas = Image.new("RGB", (LABEL_WIDTH + per_class * cell, len(names) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for r, positions in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 6), names[r], fill="black")
        for c, pos in enumerate(positions):
            tile = Image.fromarray(part[pos].image).resize((32 * scale, 32 * scale), Image.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + c * cell + 1, r * cell + 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    return out
