"""The report's pictures: sample grids and histograms, PNGs whose title is also the PNG's
Title text chunk (so a viewer or a script can tell them apart without opening them)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from cifar5m.core.atomic import atomic_write_bytes


def write_grid(images: np.ndarray, path: Path, *, ncol: int = 8, scale: int = 2,
               title: str | None = None) -> Path:
    """Tile uint8 NHWC ``images`` into a PNG (1 px white border, nearest-neighbour upscale),
    under ``title`` (drawn, and the PNG's Title text chunk) if given."""
    from PIL import Image

    from cifar5m.shards.grid import titled_png

    nrow = max(1, -(-len(images) // ncol))
    canvas = np.full((nrow * 34, ncol * 34, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        canvas[r * 34 + 1 : r * 34 + 33, c * 34 + 1 : c * 34 + 33] = im
    img = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    if title is not None:
        atomic_write_bytes(path, titled_png(img, title))
        return path
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_fig(fig, path: Path) -> None:
    """PNG of ``fig``; its axes' title is also the PNG's Title text chunk."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    title = fig.axes[0].get_title() if fig.axes else ""
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Title": title})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def class_histogram_figure(counts: np.ndarray, names: list[str], title: str):
    """Bars of samples per class and a dashed line at the balanced count (total / classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(names)), counts, color="tab:blue", label="samples")
    balanced = float(np.sum(counts)) / max(len(names), 1)
    ax.axhline(balanced, color="black", linestyle="--", linewidth=1,
               label=f"balanced: {balanced:,.1f} per class")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend(loc="best")
    return fig


def class_histogram(counts: np.ndarray, names: list[str], path: Path, title: str) -> None:
    save_fig(class_histogram_figure(counts, names, title), path)


def confidence_histogram(conf: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(conf, bins=np.linspace(0, 1, 41), color="tab:orange")
    ax.set_xlabel("labeler confidence (max softmax)")
    ax.set_ylabel("samples")
    ax.set_title(title)
    save_fig(fig, path)
