"""Click options shared by several commands, and options built from a stage's config.

A stage's frozen config dataclass is the one place of its defaults: ``config_option`` reads
the default from the field, so ``--workers`` and ``ServeConfig.workers`` cannot disagree
(tests/test_cli_defaults.py checks every command)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import click


def field_default(config: type, name: str) -> Any:
    """The default of dataclass ``config``'s field ``name`` (None if it has none)."""
    field = {f.name: f for f in dataclasses.fields(config)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def config_option(config: type, name: str, *decls: str, **kwargs: Any) -> Callable:
    """``click.option`` for field ``name`` of ``config``: named after the field, its default the
    field's. ``decls`` default to ``--field-name``; a ``--x/--no-x`` pair may be given."""
    default = field_default(config, name)
    kwargs.setdefault("show_default", default is not None and not kwargs.get("is_flag"))
    return click.option(*(decls or ("--" + name.replace("_", "-"),)), name, default=default, **kwargs)


def parse_size(value: str | None) -> int | None:
    """'500M', '2G', '123' -> bytes."""
    if value is None:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = value.strip().upper().rstrip("B")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
    except (ValueError, IndexError):
        raise click.BadParameter(f"{value!r} is not a size like 500M or 2G") from None


def parse_storage_options(text: str | None) -> dict | None:
    """``--storage-options`` JSON -> a dict."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"--storage-options is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise click.BadParameter("--storage-options must be a JSON object")
    return value


def storage_options_option(help: str = 'fsspec options as JSON, e.g. \'{"anon": true}\' for s3://.'
                           ) -> Callable:
    """``--storage-options``, parsed to a dict before the command runs."""
    return click.option("--storage-options", help=help,
                        callback=lambda _ctx, _param, value: parse_storage_options(value))
