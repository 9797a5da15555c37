"""``manifest.json``: the versioned table of contents of a dataset.

Written last by the writer (its presence means the dataset is complete) and read
first by every reader; per shard it records file, split, sample count, first key,
bytes and sha256, so anyone can check a copy without trusting its transport.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar5m.errors import DatasetNotFoundError, DiskFullError, ManifestError, ManifestVersionError
from shards.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SPLITS, WORK_DIR


@dataclass(frozen=True)
class ShardInfo:
    """One shard file as the manifest records it."""

    file: str
    split: str
    samples: int
    first_key: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class FileInfo:
    """A non-shard file of the dataset (index, card) with its checksum."""

    file: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json``."""

    image_format: str
    class_names: tuple[str, ...]
    shards: tuple[ShardInfo, ...]
    files: tuple[FileInfo, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def split_shards(self, split: str) -> list[ShardInfo]:
        """The shards of ``split`` in order."""
        return [s for s in self.shards if s.split == split]

    @property
    def splits(self) -> list[str]:
        present = {s.split for s in self.shards}
        return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))

    def totals(self) -> dict[str, dict[str, int]]:
        """Samples, shards and bytes per split."""
        out: dict[str, dict[str, int]] = {}
        for split in self.splits:
            shards = self.split_shards(split)
            out[split] = {
                "samples": sum(s.samples for s in shards),
                "shards": len(shards),
                "bytes": sum(s.bytes for s in shards),
            }
        return out

    def file_info(self, name: str) -> FileInfo | None:
        return next((f for f in self.files if f.file == name), None)

    def to_json(self) -> str:
        doc = {
            "format": self.format,
            "version": self.version,
            "image_format": self.image_format,
            "class_names": list(self.class_names),
            "totals": self.totals(),
            "files": [dataclasses.asdict(f) for f in self.files],
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "provenance": self.provenance,
        }
        return json.dumps(doc, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str) -> Manifest:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{where} is not valid JSON ({exc}); re-create the dataset") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ManifestError(f"{where} is not a {FORMAT_NAME} manifest (no 'format' field)")
        version = doc.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ManifestVersionError(
                f"{where} has format version {version!r} but this cifar5m reads up to "
                f"version {FORMAT_VERSION}; upgrade cifar5m (pip install -U cifar5m)"
            )
        try:
            return cls(
                image_format=doc["image_format"],
                class_names=tuple(doc["class_names"]),
                shards=tuple(ShardInfo(**s) for s in doc["shards"]),
                files=tuple(FileInfo(**f) for f in doc.get("files", [])),
                provenance=doc.get("provenance", {}),
                format=doc["format"],
                version=version,
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{where} is missing or has a malformed field: {exc}") from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and a rename.

    A crash leaves either the old file or the new one under ``path``, never half of one.
    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600, so a
    server or reader running as another user can read it.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise disk_full(path, len(data)) from None
        raise


def megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def disk_full(path: Path, needed: int) -> DiskFullError:
    """The error for a write of ``needed`` bytes to ``path`` that ran out of space."""
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        free = 0
    error = DiskFullError(
        f"no space left on the device of {Path(path).parent} while writing {Path(path).name}: it "
        f"needs {megabytes(needed)}, {megabytes(free)} are free; free some space (or choose another "
        f"output directory) and re-run: finished files are kept")
    error.errno = errno.ENOSPC
    return error


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX needs the directory's entry synced too)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on this platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UMASK = _umask()  # read once: os.umask is process-wide and not thread-safe to toggle


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Atomically write ``root/manifest.json``."""
    path = Path(root) / MANIFEST_NAME
    atomic_write_bytes(path, manifest.to_json().encode())
    return path


def read_manifest_text(text: str, *, where: str) -> Manifest:
    """Parse manifest text fetched from anywhere (a URL, an fsspec file)."""
    return Manifest.from_json(text, where=where)


def load_manifest(root: str | Path) -> Manifest:
    """Read ``root/manifest.json`` of a local dataset directory."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        hint = (
            " (an unfinished write: re-run the command that made it to finish)"
            if (Path(root) / WORK_DIR).is_dir()
            else ""
        )
        raise DatasetNotFoundError(f"{root} is not a cifar5m dataset: no {MANIFEST_NAME}{hint}")
    return Manifest.from_json(path.read_text(), where=str(path))
