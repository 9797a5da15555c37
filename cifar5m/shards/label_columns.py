"""New labels for a dataset in a new version of its index; the shards are not touched.

``write_labels`` replaces the index's ``label``, ``confidence`` and ``probs`` columns
and keeps the previous labels as a named int16 column, so labelers can be compared
row by row. The index's schema metadata (``cifar5m.index``, JSON) says which version
it is, which column still equals the ``.cls`` members inside the shards (what
``verify --decode`` compares them with) and which labeler made each label column::

    {"version": 2, "shard_labels": "label_v1", "parent_sha256": "<previous index>",
     "labels": {"label": {...labeler...}, "label_v1": {...}}}

Every reader that takes labels from the index (``cifar5m.shards.reader``, the streaming
loader, ``stream --format tar``) sees the new labels; a reader of the raw tars (the
``datasets`` webdataset builder) sees the shards' own. Write order: the new index
goes to a temp file, is fsynced and renamed over the old one, then the manifest
(with the index's new sha256) replaces the old manifest. A crash between the two
renames leaves an index whose ``parent_sha256`` is the one the manifest lists;
``write_labels`` run again finishes that manifest (``finish_pending``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cifar5m.core.errors import ConfigMismatchError, ManifestError
from cifar5m.shards.format import INDEX_NAME
from cifar5m.shards.index import SCHEMA, read_index, write_table
from cifar5m.shards.manifest import Manifest, load_manifest, write_manifest
from cifar5m.shards.shard import sha256_file
from cifar5m.shards.writer import with_files

META_KEY = b"cifar5m.index"


def index_meta(table: pa.Table) -> dict[str, Any]:
    """The index version record; version 1 (labels as in the shards) if none is stored."""
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        return {"version": 1, "shard_labels": "label", "labels": {}}
    return json.loads(raw)


def shard_label_column(table: pa.Table) -> str:
    """The index column that equals the ``.cls`` members of the shards."""
    return index_meta(table)["shard_labels"]


def finish_pending(root: str | Path) -> bool:
    """Finish a relabel or upgrade whose index was replaced but whose manifest was not; True if
    done."""
    root = Path(root)
    manifest = load_manifest(root)
    listed = manifest.file_info(INDEX_NAME)
    if listed is None or sha256_file(root / INDEX_NAME) == listed.sha256:
        return False
    meta = index_meta(read_index(root / INDEX_NAME, columns=["key"]))
    if meta.get("parent_sha256") != listed.sha256 or "pending_provenance" not in meta:
        raise ManifestError(f"{root / INDEX_NAME} does not match the manifest's sha256 and is not a "
                            f"relabel or upgrade of it; restore the index or re-create the dataset")
    write_manifest(root, with_files(root, manifest, meta["pending_provenance"]))
    return True


def write_labels(root: str | Path, labels: np.ndarray, confidence: np.ndarray, probs: np.ndarray, *,
                 keep_as: str, labeler: dict[str, Any], summary: dict[str, Any]) -> Manifest:
    """Replace the labels of ``root`` (arrays in index row order) in a new index version."""
    root = Path(root)
    finish_pending(root)
    manifest = load_manifest(root)
    index = read_index(root / INDEX_NAME)
    n, k = len(index), len(manifest.class_names)
    if labels.shape != (n,) or confidence.shape != (n,) or probs.shape != (n, k):
        raise ValueError(f"expected {n} labels and ({n}, {k}) probabilities, got {labels.shape}, {probs.shape}")
    if keep_as in index.column_names or keep_as in SCHEMA.names:
        raise ConfigMismatchError(f"{root / INDEX_NAME} already has a column {keep_as!r}; pass another "
                                  f"--keep-as name for the current labels")
    meta = index_meta(index)
    listed = manifest.file_info(INDEX_NAME)
    before = meta["labels"].get("label") or {"labeler": manifest.provenance.get("labeler"),
                                             "source": manifest.provenance.get("source")}
    version = meta["version"] + 1
    table = index.append_column(pa.field(keep_as, pa.int16()), index["label"])
    for name, values in (("label", pa.array(labels.astype(np.int16))),
                         ("confidence", pa.array(confidence.astype(np.float32))),
                         ("probs", pa.FixedSizeListArray.from_arrays(
                             probs.astype(np.float32).ravel(), k).cast(pa.list_(pa.float32())))):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, SCHEMA.field(name), values)
    relabel = {"index_version": version, "labeler": labeler, "previous_labels": keep_as, **summary}
    provenance = dict(manifest.provenance)
    provenance["relabels"] = [*provenance.get("relabels", []), relabel]
    if isinstance(provenance.get("fingerprint"), dict):  # `generate` must not extend it any more
        provenance["fingerprint"] = {**provenance["fingerprint"], "relabeled_index": version}
    new_meta = {"version": version,
                "shard_labels": keep_as if meta["shard_labels"] == "label" else meta["shard_labels"],
                "parent_sha256": listed.sha256 if listed else None,
                "labels": {**meta["labels"], "label": labeler, keep_as: before},
                "pending_provenance": provenance}
    return replace_index(root, manifest, table, new_meta)


def replace_index(root: Path, manifest: Manifest, table: pa.Table, meta: dict[str, Any]) -> Manifest:
    """Write ``table`` as the new index (``meta`` with its ``parent_sha256`` and
    ``pending_provenance``), then the manifest listing it; ``finish_pending`` completes a
    crash between the two."""
    tmp = root / f".{INDEX_NAME}.relabel.tmp"
    try:
        write_table(tmp, table, metadata={META_KEY: json.dumps(meta)})
        with open(tmp, "rb+") as f:  # durable before it replaces the old index
            os.fsync(f.fileno())
        tmp.replace(root / INDEX_NAME)
    finally:
        tmp.unlink(missing_ok=True)
    out = with_files(root, manifest, meta["pending_provenance"])
    write_manifest(root, out)
    return out
