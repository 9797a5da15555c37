"""``cifar5m import``: convert existing datasets into the shard format, resumably."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from cifar5m.errors import DiskFullError, InvalidSourceError, SourceNotFoundError
from cifar5m.version import __version__
from shards.atomic import megabytes
from shards.format import DEFAULT_SHARD_SIZE
from shards.import_formats import (
    FORMATS,
    Item,
    detect_format,
    iter_cifar10_jpeg,
    iter_cifar10_python,
    iter_npz,
    part_number,
)
from shards.manifest import Manifest
from shards.writer import DatasetWriter, Sample


@dataclass(frozen=True)
class ImportConfig:
    """Everything that decides the imported dataset; saved in the manifest's provenance."""

    sources: tuple[str, ...]
    format: str
    image_format: str = "png"
    shard_size: int = DEFAULT_SHARD_SIZE
    # CIFAR-5m split (the paper's): parts 0-4 train, the first 10,000 images of part 5 test.
    test_part: int | None = 5
    test_count: int = 10_000
    rest_of_test_part: str = "drop"  # or "train"
    limit: int | None = None  # per split, for quick slices
    workers: int = 0
    extra: dict = field(default_factory=dict)

    def fingerprint(self) -> dict:
        """Settings that must match for an interrupted import to resume."""
        keep = ("sources", "format", "test_part", "test_count", "rest_of_test_part", "limit")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keep}


def resolve_config(sources: Sequence[str], *, format: str | None = None, **options) -> ImportConfig:
    """Build the config, detecting the format and checking the sources agree."""
    if not sources:
        raise InvalidSourceError("no sources given; pass npz parts, the CIFAR-10 JPEG tar or batches")
    for source in sources:  # before anything is written (a URL is checked when it is read)
        if "://" not in str(source) and not Path(source).exists():
            raise SourceNotFoundError(f"import source {source} does not exist; check the path")
    fmt = format or detect_format(sources[0])
    if fmt not in FORMATS:
        raise InvalidSourceError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt != "cifar5m-npz" and len(sources) > 1:
        raise InvalidSourceError(f"{fmt} takes one source, got {len(sources)}")
    if options.get("rest_of_test_part", "drop") not in ("drop", "train"):
        raise InvalidSourceError("--rest-of-test-part must be 'drop' or 'train'")
    return ImportConfig(sources=tuple(str(s) for s in sources), format=fmt, **options)


def iter_items(config: ImportConfig) -> Iterator[Item]:
    """All items of the sources in import order (before --limit)."""
    if config.format == "cifar10-jpeg":
        yield from iter_cifar10_jpeg(config.sources[0])
    elif config.format == "cifar10-python":
        yield from iter_cifar10_python(config.sources[0])
    else:
        for i, source in enumerate(config.sources):
            part = part_number(source, i)
            yield from iter_npz(source, part=part, split_of=_npz_splitter(config, part))


def _npz_splitter(config: ImportConfig, part: int):
    if part != config.test_part:
        return lambda row: "train"
    rest = "train" if config.rest_of_test_part == "train" else None
    return lambda row: "test" if row < config.test_count else rest


def _limited(items: Iterator[Item], limit: int | None) -> Iterator[Item]:
    if limit is None:
        yield from items
        return
    seen: dict[str, int] = {}
    for item in items:
        seen[item.split] = seen.get(item.split, 0) + 1
        if seen[item.split] <= limit:
            yield item


def import_dataset(out: str | Path, config: ImportConfig, *, progress: bool = True) -> Manifest:
    """Import ``config.sources`` into ``out``; re-running after a crash finishes the job."""
    provenance = {
        "tool": f"cifar5m {__version__}",
        "source": f"{config.format}: {', '.join(config.sources)}",
        "importer": asdict(config),
        "name": "CIFAR-5m (imported)" if config.format == "cifar5m-npz" else "CIFAR-10 (imported)",
        "license": "other" if config.format == "cifar5m-npz" else "unknown",
    }
    try:
        return _write(out, config, provenance, progress=progress)
    except DiskFullError as exc:
        raise DiskFullError(f"{exc}. {_space_needed(out, config)}") from None


def _space_needed(out: str | Path, config: ImportConfig) -> str:
    """How much the whole import needs, from the shards written so far (a full disk)."""
    from shards.shard import load_records

    try:
        records = load_records(out, check=False).values()
    except Exception:  # best effort on a full disk
        records = []
    samples = sum(r.info.samples for r in records)
    written = sum(r.info.bytes for r in records)
    total = planned_samples(config)
    if not samples:
        return "Nothing was finished yet; a shard of PNG CIFAR images takes ~2.5 KB per sample, npy ~5 KB"
    per = written / samples
    if total is None:
        return f"Shards take {per:,.0f} bytes per sample ({megabytes(written)} for {samples:,} so far)"
    return (f"The import needs about {megabytes(per * total)} for {total:,} samples "
            f"({megabytes(per * max(0, total - samples))} more than the {megabytes(written)} written)")


def planned_samples(config: ImportConfig) -> int | None:
    """Samples the import will write (None where the sources do not say cheaply)."""
    if config.format in ("cifar10-jpeg", "cifar10-python"):
        counts = [50_000, 10_000]
    else:
        import zipfile

        import fsspec

        counts = []
        try:
            for source in config.sources:
                with fsspec.open(source, "rb") as raw, zipfile.ZipFile(raw) as zf:
                    counts.append(zf.getinfo("X.npy").file_size // 3072)
        except Exception:  # only an estimate
            return None
    if config.limit is not None:
        counts = [min(c, config.limit) for c in counts]
    return sum(counts)


def _write(out: str | Path, config: ImportConfig, provenance: dict, *, progress: bool) -> Manifest:
    with DatasetWriter(
        out, fingerprint=config.fingerprint(), image_format=config.image_format,
        shard_size=config.shard_size, provenance=provenance, workers=config.workers,
    ) as writer, tqdm(desc=f"import {Path(str(out)).name}", unit="img", disable=not progress,
                      smoothing=0.05) as bar:
        skip = {split: writer.completed(split) for split in ("train", "test")}
        bar.update(sum(skip.values()))
        seen = dict.fromkeys(skip, 0)
        for item in _limited(iter_items(config), config.limit):
            seen[item.split] = seen.get(item.split, 0) + 1
            if seen[item.split] <= skip.get(item.split, 0):
                continue  # already in a finished shard of an interrupted run
            writer.add(item.split, Sample(item.key, item.load(), item.label))
            bar.update()
    return writer.manifest


__all__ = ["ImportConfig", "import_dataset", "iter_items", "resolve_config"]
