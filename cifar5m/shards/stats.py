"""``cifar5m info``: what a dataset holds, from its manifest and index alone (read through
the dataset's byte source, ``cifar5m.shards.source.open_source``, as every reader of the format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from cifar5m.shards.catalog import index_input, read_manifest
from cifar5m.shards.format import INDEX_NAME
from cifar5m.shards.index import read_index
from cifar5m.shards.source import open_source


def describe(root: str | Path) -> dict[str, Any]:
    """Counts, class histogram, bytes per sample and provenance of a dataset."""
    source = open_source(str(root))
    root = Path(root) if source.local else source.url
    manifest = read_manifest(source)
    columns, where = ["split", "label"], str(root / INDEX_NAME if source.local else f"{root}/{INDEX_NAME}")
    if source.local:  # two columns read from the open file, never the whole index in memory
        with source.open_file(INDEX_NAME) as f:
            index = read_index(f, columns=columns, where=where)
    else:
        index = read_index(index_input(source.read_file(INDEX_NAME)), columns=columns, where=where)
    splits = {}
    for split, total in manifest.totals().items():
        labels = index.filter(pc.equal(index["split"], split))["label"].to_numpy()
        hist = np.bincount(labels, minlength=len(manifest.class_names))
        splits[split] = {
            **total,
            "bytes_per_sample": round(total["bytes"] / max(total["samples"], 1), 1),
            "classes": {name: int(c) for name, c in zip(manifest.class_names, hist, strict=False)},
        }
    return {
        "path": str(root),
        "format": f"{manifest.format} v{manifest.version}",
        "image_format": manifest.image_format,
        "splits": splits,
        "provenance": manifest.provenance,
    }


def format_description(info: dict[str, Any]) -> str:
    """Human-readable text of ``describe``'s result."""
    lines = [f"{info['path']}  ({info['format']}, {info['image_format']} images)"]
    for split, s in info["splits"].items():
        lines.append(
            f"  {split}: {s['samples']:,} samples in {s['shards']} shards, "
            f"{s['bytes'] / 1e6:,.1f} MB, {s['bytes_per_sample']:,.0f} bytes/sample"
        )
        lines.append("    " + "  ".join(f"{name} {count:,}" for name, count in s["classes"].items()))
    prov = info["provenance"]
    for key in ("tool", "source", "name"):
        if key in prov:
            lines.append(f"  {key}: {prov[key]}")
    return "\n".join(lines)
