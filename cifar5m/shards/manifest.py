"""``manifest.json``: the versioned table of contents of a dataset.

Written last by the writer (its presence means the dataset is complete) and read
first by every reader; per shard it records file, split, sample count, first key,
bytes and sha256, so anyone can check a copy without trusting its transport.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar5m.core.atomic import atomic_write_bytes
from cifar5m.core.errors import DatasetNotFoundError, ManifestError, ManifestVersionError
from cifar5m.shards.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SPLITS, WORK_DIR


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
