"""``cifar5m import``: convert existing datasets into the shard format, resumably."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from cifar5m.core.atomic import megabytes
from cifar5m.core.errors import DiskFullError, InvalidSourceError, SourceNotFoundError
from cifar5m.core.version import __version__
from cifar5m.shards.format import DEFAULT_SHARD_SIZE, IMAGE_BYTES
from cifar5m.shards.import_formats import (
    FORMATS,
    Item,
    detect_format,
    iter_cifar10_jpeg,
    iter_cifar10_python,
)
from cifar5m.shards.import_npz import iter_npz, part_number
from cifar5m.shards.manifest import Manifest
from cifar5m.shards.writer import DatasetWriter, Sample


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


def iter_items(
    config: ImportConfig, *, on_source: Callable[[str], object] | None = None,
    on_dropped: Callable[[int], object] | None = None,
) -> Iterator[Item]:
    """All items of the sources in import order (before --limit).

    ``on_source(source)`` is called as each source is opened and ``on_dropped(n)`` with
    rows read but not imported (the rest of the test part), for progress reports.
    """
    if config.format in ("cifar10-jpeg", "cifar10-python"):
        if on_source is not None:
            on_source(config.sources[0])
        reader = iter_cifar10_jpeg if config.format == "cifar10-jpeg" else iter_cifar10_python
        yield from reader(config.sources[0])
        return
    for i, source in enumerate(config.sources):
        if on_source is not None:
            on_source(source)
        part = part_number(source, i)
        yield from iter_npz(source, part=part, split_of=_npz_splitter(config, part), on_dropped=on_dropped)


def _npz_splitter(config: ImportConfig, part: int):
    if part != config.test_part:
        return lambda row: "train"
    rest = "train" if config.rest_of_test_part == "train" else None
    return lambda row: "test" if row < config.test_count else rest


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
    from cifar5m.shards.shard import load_records

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
    """Samples the import will write: each split's rows, at most ``--limit`` per split as the
    import applies it (None where the sources do not say cheaply)."""
    rows = split_rows(config)
    if rows is None:
        return None
    return sum(n if config.limit is None else min(n, config.limit) for n in rows.values())


def split_rows(config: ImportConfig) -> dict[str, int] | None:
    """Rows each split gets from the sources (before ``--limit``): npz parts split as
    ``iter_items`` splits them, the test part's rest dropped or trained on."""
    if config.format in ("cifar10-jpeg", "cifar10-python"):
        return {"train": 50_000, "test": 10_000}
    counts = source_rows(config)
    if counts is None:
        return None
    out = {"train": 0, "test": 0}
    for i, (source, n) in enumerate(zip(config.sources, counts, strict=True)):
        if part_number(source, i) != config.test_part:
            out["train"] += n
            continue
        test = min(n, config.test_count)
        out["test"] += test
        if config.rest_of_test_part == "train":
            out["train"] += n - test
    return out


def source_rows(config: ImportConfig) -> list[int] | None:
    """Rows in each npz source, from its zip directory (X.npy's size; nothing decoded).

    None for the CIFAR-10 formats (whose readers list files first) or an unreadable source.
    """
    if config.format != "cifar5m-npz":
        return None
    import zipfile

    import fsspec

    counts = []
    try:
        for source in config.sources:
            with fsspec.open(source, "rb") as raw, zipfile.ZipFile(raw) as zf:
                counts.append(zf.getinfo("X.npy").file_size // IMAGE_BYTES)  # header < one row
    except Exception:  # only for the progress bar; reading reports the real error
        return None
    return counts


def _write(out: str | Path, config: ImportConfig, provenance: dict, *, progress: bool) -> Manifest:
    with DatasetWriter(
        out, fingerprint=config.fingerprint(), image_format=config.image_format,
        shard_size=config.shard_size, provenance=provenance, workers=config.workers,
    ) as writer, _progress_bar(out, config, enabled=progress) as bar:
        skip = {split: writer.completed(split) for split in ("train", "test")}
        seen = dict.fromkeys(skip, 0)
        # The bar counts rows read from the sources: imported, skipped on resume, past
        # --limit, or dropped (the rest of the test part), so it ends at its total.
        items = iter_items(config, on_source=lambda s: bar.set_postfix_str(_short(s), refresh=False),
                           on_dropped=bar.update)
        for item in items:
            bar.update()
            n = seen[item.split] = seen.get(item.split, 0) + 1
            if n <= skip.get(item.split, 0) or (config.limit is not None and n > config.limit):
                continue  # in a finished shard of an interrupted run, or past --limit
            writer.add(item.split, Sample(item.key, item.load(), item.label))
    return writer.manifest


def _progress_bar(out: str | Path, config: ImportConfig, *, enabled: bool) -> tqdm:
    """Rows read out of all rows in the sources (from their headers), with the current
    source as postfix: total, percentage and ETA for npz parts, a count for CIFAR-10."""
    rows = source_rows(config)
    return tqdm(desc=f"import {Path(str(out)).name}", unit="img", total=sum(rows) if rows else None,
                disable=not enabled, smoothing=0.05, unit_scale=False, dynamic_ncols=True)


def _short(source: str) -> str:
    return source.rstrip("/").rsplit("/", 1)[-1]


__all__ = ["ImportConfig", "import_dataset", "iter_items", "resolve_config"]
