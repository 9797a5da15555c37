"""fsspec URL outputs (``--out s3://...``): local staging, the remote manifest, upload.

A URL output is built in a local staging directory and uploaded when finished,
manifest last. Before anything is written, the remote ``manifest.json`` (if any) is
checked like a local one: other settings or a larger existing count are refused,
and extending needs the remote dataset's shards in staging (they are not downloaded).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cifar5m.errors import DatasetExistsError, OutputNotWritableError
from shards.format import MANIFEST_NAME
from shards.lock import LOCK_NAME
from shards.manifest import Manifest, read_manifest_text

DEFAULT_STAGING = "~/.cache/cifar5m/staging"


def is_url(out: str) -> bool:
    return "://" in out and not out.startswith("file://")


def staging_root(out: str, staging: str | None) -> Path:
    """Where the dataset for URL ``out`` is built: ``<staging>/<hash of the URL>``."""
    digest = hashlib.sha256(out.encode()).hexdigest()[:16]
    return Path(staging or DEFAULT_STAGING).expanduser() / digest


def read_manifest(url: str) -> Manifest | None:
    """The manifest at ``url``, or None when there is none (nothing finished there)."""
    import fsspec

    where = f"{url.rstrip('/')}/{MANIFEST_NAME}"
    try:
        fs, base = fsspec.core.url_to_fs(url)
        text = fs.cat_file(f"{base.rstrip('/')}/{MANIFEST_NAME}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, ImportError) as exc:
        raise OutputNotWritableError(f"cannot read {where}: {exc}; check the URL and its "
                                     f"credentials, or choose another --out") from None
    return read_manifest_text(text.decode(), where=where)


def check_staged(url: str, manifest: Manifest, root: Path, keep: dict[str, int]) -> None:
    """Refuse to extend the remote dataset unless staging holds the shards to keep.

    ``keep``: the planned size of each shard. Only shards kept at their remote size
    must be staged (a partial last train shard is regenerated anyway); a staged copy
    counts when its byte size matches the remote manifest (sha256 is checked by
    ``shards.writer.begin`` for unfinished writes and by ``cifar5m verify``).
    """
    missing = [s.file for s in manifest.shards
               if keep.get(s.file) == s.samples and not _staged(root / s.file, s.bytes)]
    if missing:
        have = sum(s.samples for s in manifest.shards)
        raise DatasetExistsError(
            f"{url} holds a finished dataset of {have:,} samples, but the staging directory "
            f"{root} does not hold its shards (e.g. {missing[0]}), so it cannot be extended "
            f"here: copy the dataset into {root} (or pass --staging DIR where a copy is) and "
            f"re-run, or choose another --out")


def _staged(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def upload(root: Path, url: str) -> None:
    """Copy the finished dataset to an fsspec URL, manifest last (readers wait for it)."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(url)
    fs.makedirs(base, exist_ok=True)
    names = sorted(p.name for p in root.iterdir() if p.is_file() and p.name != LOCK_NAME)
    for name in [n for n in names if n != MANIFEST_NAME] + [MANIFEST_NAME]:
        fs.put_file(str(root / name), f"{base.rstrip('/')}/{name}")
