"""``cifar5m upgrade DIR``: bring a format-version-1 dataset to version 2 in place.

Version 2 always has the per-member checksum columns (``cifar5m.shards.checksum``); version 1
indexes written before them have none, and readers refuse those with a line that names this
command. The upgrade checks every shard against its sha256 in the manifest, computes the
digests from the shard bytes, and writes them as a new version of the index (every other
column and the relabel history kept) followed by the manifest, with the same crash recovery
as a relabel (``label_columns.replace_index``): a rerun finishes an interrupted upgrade.
The shards themselves are never touched.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from cifar5m.core.errors import CorruptShardError, ManifestError
from cifar5m.shards import checksum
from cifar5m.shards.format import FORMAT_VERSION, INDEX_NAME
from cifar5m.shards.index import read_index, shard_runs
from cifar5m.shards.label_columns import finish_pending, index_meta, replace_index
from cifar5m.shards.lock import DirectoryLock
from cifar5m.shards.manifest import Manifest, load_manifest


def upgrade_dataset(root: str | Path) -> tuple[int, Manifest]:
    """Upgrade ``root`` to the current format version; returns (the version it had, the
    manifest now). A dataset already at the current version is left as it is."""
    root = Path(root)
    with DirectoryLock(root, what="upgraded"):
        finish_pending(root)
        manifest = load_manifest(root)
        if manifest.version >= FORMAT_VERSION:
            return manifest.version, manifest
        index = read_index(root / INDEX_NAME)
        runs = shard_runs(index["shard"])
        if set(runs) != {s.file for s in manifest.shards}:
            raise ManifestError(f"{root / INDEX_NAME} and the manifest list different shards; "
                                f"run `cifar5m verify {root}`")
        digests, groups = np.zeros(len(index), np.uint64), np.zeros(len(index), np.uint64)
        for info in manifest.shards:
            data = (root / info.file).read_bytes()
            if len(data) != info.bytes or hashlib.sha256(data).hexdigest() != info.sha256:
                raise CorruptShardError(f"{root / info.file} does not match its size and sha256 in "
                                        f"the manifest; re-download or re-create it before upgrading")
            run = runs[info.file]
            rows = index.slice(run.start, run.stop - run.start)
            offsets, sizes = rows["image_offset"].to_pylist(), rows["image_size"].to_pylist()
            digests[run] = checksum.digests(data, offsets, sizes)
            groups[run] = checksum.group_digests(data, offsets, sizes)
        table = index
        for name, values in ((checksum.COLUMN, digests), (checksum.GROUP_COLUMN, groups)):
            values = pa.array(values, pa.uint64())
            if name in table.column_names:
                table = table.set_column(table.schema.get_field_index(name), name, values)
            else:
                table = table.append_column(name, values)
        provenance = {**manifest.provenance, "upgraded_from_version": manifest.version}
        meta = {**index_meta(index), "parent_sha256": manifest.file_info(INDEX_NAME).sha256,
                "pending_provenance": provenance}
        return manifest.version, replace_index(root, manifest, table, meta)
