"""``manifest.json``: the versioned table of contents of a dataset.

Written last by the writer (its presence means the dataset is complete) and read
first by every reader; per shard it records file, split, sample count, first key,
bytes and sha256, so anyone can check a copy without trusting its transport.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar5m.core.atomic import atomic_write_bytes
from cifar5m.core.errors import DatasetNotFoundError, ManifestError, ManifestVersionError
from cifar5m.shards.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_FORMATS,
    MANIFEST_NAME,
    SPLITS,
    WORK_DIR,
)

# A file of a dataset: one plain name (no folder, no leading dot: temp files are '.x.tmp').
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def safe_path(root: str | os.PathLike | None, name: object, *, where: str) -> Path:
    """``root / name`` for a file name taken from a manifest or a listing (``where`` names it
    in the error), if it stays inside ``root``: one plain name (never absolute, no '..', no
    folder, no leading dot) and, when ``root`` is given, no symlink leading out of it.
    Anything else is a ManifestError naming the entry; nothing is opened."""
    shown = repr(name)[:100]
    if not isinstance(name, str) or _FILE.fullmatch(name) is None:
        raise ManifestError(f"{where} lists the file {shown}, which is not a plain file name inside the "
                            f"dataset folder (letters, digits, '.', '_', '-'); refusing to touch it")
    if root is None:
        return Path(name)
    path, real_root = Path(root) / name, os.path.realpath(root)
    real = os.path.realpath(path)
    if real == real_root or os.path.commonpath([real, real_root]) != real_root:
        raise ManifestError(f"{where} lists {shown}, a symlink leading out of {root}; refusing to follow it")
    return path


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
    def from_json(cls, text: str | bytes, *, where: str) -> Manifest:
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep
            raise ManifestError(f"{where} is not valid JSON ({str(exc)[:200]}); re-create the dataset") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ManifestError(f"{where} is not a {FORMAT_NAME} manifest (no 'format' field)")
        version = doc.get("version")
        if type(version) is not int or version < 1:
            raise ManifestError(f"{where} has no format version (its 'version' is {str(version)[:40]!r}); "
                                f"re-create the dataset")
        if version > FORMAT_VERSION:
            raise ManifestVersionError(
                f"{where} has format version {version!r} but this cifar5m reads up to "
                f"version {FORMAT_VERSION}; upgrade cifar5m (pip install -U cifar5m)"
            )
        try:
            manifest = cls(
                image_format=doc["image_format"],
                class_names=tuple(doc["class_names"]),
                shards=tuple(_entry(ShardInfo, s) for s in doc["shards"]),
                files=tuple(_entry(FileInfo, f) for f in doc.get("files", [])),
                provenance=doc.get("provenance", {}),
                format=doc["format"],
                version=version,
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{where} is missing or has a malformed field: {exc}") from None
        manifest._check(where)
        return manifest

    def _check(self, where: str) -> None:
        """The types and ranges a reader relies on (``where`` names the manifest)."""
        problem = None
        if self.image_format not in IMAGE_FORMATS:
            problem = f"image_format {self.image_format!r:.80} (not one of {', '.join(IMAGE_FORMATS)})"
        elif not self.class_names or not all(isinstance(c, str) for c in self.class_names):
            problem = f"class_names {list(self.class_names)!r:.80} (not a list of one or more names)"
        elif not isinstance(self.provenance, dict):
            problem = f"provenance {self.provenance!r:.80} (not an object)"
        seen: set[str] = set()
        for info in (*self.shards, *self.files):
            safe_path(None, info.file, where=where)
            if _SHA256.fullmatch(info.sha256) is None:
                problem = problem or f"{info.file}: sha256 {info.sha256!r:.80} (not 64 hex digits)"
            elif info.file in seen:
                problem = problem or f"{info.file} listed twice"
            seen.add(info.file)
        if problem:
            raise ManifestError(f"{where} has a malformed field: {problem}; re-create the dataset")


def _entry(cls: type, doc: object) -> ShardInfo | FileInfo:
    """A ``files`` or ``shards`` entry, its fields of the types the dataclass declares."""
    if not isinstance(doc, dict):
        raise TypeError(f"an entry is {type(doc).__name__}, not an object")
    entry = cls(**doc)
    for f in dataclasses.fields(cls):
        value, kind = getattr(entry, f.name), int if f.type == "int" else str
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise TypeError(f"{f.name} of {doc.get('file')!r:.100} is {value!r:.100}, not a "
                            f"{'count' if kind is int else 'string'}")
    return entry


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Atomically write ``root/manifest.json``."""
    path = Path(root) / MANIFEST_NAME
    atomic_write_bytes(path, manifest.to_json().encode())
    return path


def read_manifest_text(text: str | bytes, *, where: str) -> Manifest:
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
    return Manifest.from_json(path.read_bytes(), where=str(path))
