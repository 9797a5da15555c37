"""Commands on the shard format: import, verify, info, grid."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cifar5m.cli.options import config_option, storage_options_option
from cifar5m.shards.format import IMAGE_FORMATS
from cifar5m.shards.importer import ImportConfig


@click.command("import")
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Dataset directory to write.")
@click.option("--format", "fmt", type=click.Choice(["cifar5m-npz", "cifar10-jpeg", "cifar10-python"]),
              help="Source format (detected when not given).")
@config_option(ImportConfig, "image_format", type=click.Choice(IMAGE_FORMATS),
              help="png: lossless, Hub-viewable; npy: raw uint8, ~20x faster to read.")
@config_option(ImportConfig, "shard_size", type=click.IntRange(min=1),
              help="Samples per shard.")
@config_option(ImportConfig, "test_part", type=int, callback=lambda _c, _p, v: None if v is not None and v < 0 else v,
              help="cifar5m-npz: the part whose first --test-count images form the test split (-1: none).")
@config_option(ImportConfig, "test_count", type=click.IntRange(min=0),
              help="cifar5m-npz: test images taken from --test-part.")
@config_option(ImportConfig, "rest_of_test_part", type=click.Choice(["drop", "train"]),
              help="cifar5m-npz: what happens to the rest of the test part (the paper drops it).")
@config_option(ImportConfig, "limit", type=click.IntRange(min=1), help="Import at most this many samples per split.")
@config_option(ImportConfig, "workers", type=click.IntRange(min=0),
              help="Processes encoding shards in parallel (0: in this process).")
def import_cmd(sources: tuple[str, ...], out: str, fmt: str | None, **fields) -> None:
    """Convert CIFAR-5m npz parts or CIFAR-10 into a cifar5m dataset.

    SOURCES are local paths or URLs (npz parts are read in chunks, so memory stays
    flat), or the word cifar10: the official CIFAR-10 archive, downloaded once into the
    user cache (~/.cache/cifar5m), resumed after a break and checked against its
    published MD5. An interrupted import resumes when the same command is run again.

    \b
    Examples:
      cifar5m import cifar10 --out data/cifar10
      cifar5m import cifar10-jpeg.tar.gz --out data/cifar10
      cifar5m import cifar5m_part{0,1,2,3,4,5}.npz --out data/cifar5m --workers 8
      cifar5m import cifar-10-batches-py --out data/cifar10-orig
    """
    from cifar5m.shards.importer import import_dataset, resolve_config
    from cifar5m.shards.stats import describe, format_description

    if sources == ("cifar10",) and not Path("cifar10").exists():  # the official archive, cached
        from cifar5m.core.errors import OfflineError
        from cifar5m.shards.cifar10_archive import fetch_cifar10

        try:
            sources, fmt = (str(fetch_cifar10()),), fmt or "cifar10-python"
        except OfflineError as exc:
            raise OfflineError(f"{exc}; offline, import a copy of the archive instead: "
                               f"cifar5m import PATH/cifar-10-python.tar.gz --out {out}") from None
    config = resolve_config(list(sources), format=fmt, **fields)
    import_dataset(out, config)
    click.echo(format_description(describe(out)))


def _directory_or_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A URL as given; a local path must be an existing directory (as click.Path checks)."""
    if "://" in value:
        return value
    return click.Path(exists=True, file_okay=False).convert(value, param, ctx)


@click.command("verify")
@click.argument("root", callback=_directory_or_url)
@click.option("--decode", is_flag=True, help="Also decode every image and label.")
@storage_options_option()
def verify_cmd(root: str, decode: bool, storage_options: dict | None) -> None:
    """Recompute every checksum and count of a dataset (and decode every image).

    ROOT is a dataset directory or URL (http(s), s3://, ...). Exits 1 with one line
    naming the file (and byte offset) at the first problem.

    \b
    Examples:
      cifar5m verify data/cifar10 --decode
      cifar5m verify http://127.0.0.1:8000/datasets/local/cifar10/resolve/main
    """
    from cifar5m.shards.verify import verify_dataset

    report = verify_dataset(root, decode=decode, storage_options=storage_options)
    counts = ", ".join(f"{n:,} {split}" for split, n in report.samples.items())
    decoded = f", {report.decoded:,} images decoded" if decode else ""
    click.echo(f"OK: {report.shards} shards, {counts} samples, {report.bytes / 1e6:,.1f} MB{decoded}")


@click.command("info")
@click.argument("root", callback=_directory_or_url)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info_cmd(root: str, as_json: bool) -> None:
    """Show counts, class histogram, bytes per sample and provenance (ROOT: a dataset
    directory or an http(s) URL).

    \b
    Example:
      cifar5m info data/cifar10
    """
    from cifar5m.shards.stats import describe, format_description

    info = describe(root)
    click.echo(json.dumps(info, indent=1) if as_json else format_description(info))


@click.command("grid")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--split", default="train", show_default=True)
@click.option("--per-class", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--scale", type=click.IntRange(min=1, max=8), default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def grid_cmd(root: str, out: str, split: str, per_class: int, scale: int, seed: int) -> None:
    """Write a PNG grid of samples, one row per class.

    \b
    Example:
      cifar5m grid data/cifar10 -o cifar10-grid.png
    """
    from cifar5m.shards.grid import render_grid

    click.echo(f"wrote {render_grid(root, out, split=split, per_class=per_class, scale=scale, seed=seed)}")


@click.command("upgrade")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
def upgrade_cmd(root: str) -> None:
    """Upgrade the dataset directory ROOT to the current format version, in place.

    Version 2 adds per-member checksums to the index (read from the shards, each checked
    against its sha256 first); the shards are not changed. Safe to interrupt: running it
    again finishes the upgrade.

    \b
    Example:
      cifar5m upgrade data/cifar10
    """
    from cifar5m.shards.format import FORMAT_VERSION
    from cifar5m.shards.upgrade import upgrade_dataset

    before, manifest = upgrade_dataset(root)
    if before >= FORMAT_VERSION:
        click.echo(f"{root} is already format version {before}; nothing to do")
    else:
        click.echo(f"{root}: format version {before} -> {manifest.version} "
                   f"({sum(s.samples for s in manifest.shards):,} samples checked)")
