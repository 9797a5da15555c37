"""The dataset card (``README.md``) that makes a dataset directory a Hub dataset repo.

The YAML front matter declares one config whose splits point at the tar shards (so
``datasets`` picks its WebDataset builder), and features named after the tar
members (``png``/``npy`` and ``cls``), which is how that builder names columns.
Declaring them saves the client a probe of the first shard (which for npy, without
them, downloads a whole shard and infers nested lists and a plain integer ``cls``):
``png`` is an ``Image``, ``npy`` an ``Array3D`` of uint8 (32, 32, 3) (the builder
``np.load``s the member), ``cls`` a ``ClassLabel`` with the class names.
"""

from __future__ import annotations

import yaml

from cifar5m.shards.format import IMAGE_SHAPE, SHARD_GLOB
from cifar5m.shards.manifest import Manifest


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket for ``n`` samples."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
              (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]
    return next((label for bound, label in bounds if n < bound), "100M<n<1B")


def card_metadata(manifest: Manifest) -> dict:
    """The YAML front matter as a dict."""
    totals = manifest.totals()
    label_feature = {"name": "cls", "dtype": {"class_label": {"names": {
        str(i): name for i, name in enumerate(manifest.class_names)}}}}
    image = ({"name": "png", "dtype": "image"} if manifest.image_format == "png" else
             {"name": "npy", "dtype": {"array3_d": {"shape": list(IMAGE_SHAPE), "dtype": "uint8"}}})
    info: dict = {"features": [image, label_feature], "splits": [
        {"name": split, "num_bytes": t["bytes"], "num_examples": t["samples"]} for split, t in totals.items()
    ]}
    return {
        "license": manifest.provenance.get("license", "other"),
        "task_categories": ["image-classification"],
        "size_categories": [size_category(sum(t["samples"] for t in totals.values()))],
        "tags": ["cifar5m", "webdataset", "synthetic" if "generator" in manifest.provenance else "cifar10"],
        "configs": [
            {
                "config_name": "default",
                "data_files": [
                    {"split": split, "path": SHARD_GLOB.format(split=split)} for split in manifest.splits
                ],
            }
        ],
        "dataset_info": info,
    }


def render_card(manifest: Manifest) -> str:
    """The whole README.md: front matter plus a short human description."""
    meta = yaml.safe_dump(card_metadata(manifest), sort_keys=False, allow_unicode=True)
    totals = manifest.totals()
    rows = "\n".join(
        f"| {split} | {t['samples']:,} | {t['shards']} | {t['bytes'] / 1e6:,.1f} MB |"
        for split, t in totals.items()
    )
    source = manifest.provenance.get("source", "see manifest.json")
    relabels = manifest.provenance.get("relabels") or []
    if relabels:
        last = relabels[-1]
        model = (last.get("labeler") or {}).get("model") or (last.get("labeler") or {}).get("kind")
        source += (f"\n\nRelabelled (index version {last['index_version']}) by {model}: `index.parquet`'s "
                   f"`label` column holds the new labels, `{last['previous_labels']}` the previous ones. "
                   f"The `.cls` members inside the shards keep the labels they were written with.")
    return f"""---
{meta}---

# {manifest.provenance.get("name", "cifar5m dataset")}

32x32 RGB images with CIFAR-10 labels, in WebDataset shards written by
[cifar5m](https://github.com/cifar5m/cifar5m). Each sample is `<key>.{manifest.image_format}`
plus `<key>.cls` (the class index in ASCII). `manifest.json` lists every shard with its
sha256; `index.parquet` has one row per sample (shard, byte offsets, label, ...).

Source: {source}

| split | samples | shards | size |
|---|---|---|---|
{rows}

Classes: {", ".join(f"{i} {n}" for i, n in enumerate(manifest.class_names))}

```python
import datasets
ds = datasets.load_dataset("webdataset", data_files={{"train": "train-*.tar"}}, streaming=True)
```
"""
