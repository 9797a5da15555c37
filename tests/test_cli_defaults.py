"""Each default is written once: what a command parses when an option is left out is the
default of the config field (or function parameter) it fills."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import click
import pytest

from cifar5m.cli.main import COMMANDS, cli
from cifar5m.dataset_server.config import ServeConfig
from cifar5m.generator.config import GenerateConfig
from cifar5m.shards.importer import ImportConfig
from cifar5m.train.config import BootstrapConfig, StreamConfig, TrainConfig

# command -> (the arguments it needs, what its options fill)
TARGETS = {
    "serve": (["."], [ServeConfig]),
    "generate": (["--count", "10", "--out", "x"], [GenerateConfig]),
    "stream": (["x"], [StreamConfig]),
    "train": (["--data", "x", "--out", "y", "--world", "ideal"], [TrainConfig]),
    "bootstrap": (["--data", "x", "--out", "y", "--n", "5"], [BootstrapConfig, TrainConfig]),
    "import": (["x", "--out", "y"], [ImportConfig]),
    "download": (["a/b"], ["cifar5m.dataset_server.download:download"]),
    "grid": ([".", "-o", "x.png"], ["cifar5m.shards.grid:render_grid"]),
    # These three keep their defaults in the option too (their configs import torch, and
    # `cifar5m --help` must not); this test is what keeps the two equal.
    "train-labeler": (["x", "--out", "y"], ["cifar5m.generator.training.labeler_recipe:LabelerTrainConfig"]),
    "train-generator": (["x", "--out", "y"], ["cifar5m.generator.training.unet:UNetTrainConfig"]),
    "report": (["."], ["cifar5m.generator.report.summary:ReportConfig"]),
}
# CLI names of function parameters (--workers fills download's max_workers).
RENAMED = {"download": {"workers": "max_workers"}, "stream": {"workers": "num_workers"}}


def defaults(target) -> dict:
    if isinstance(target, str):
        module, attr = target.split(":")
        target = getattr(importlib.import_module(module), attr)
    if dataclasses.is_dataclass(target):
        return {f.name: f.default for f in dataclasses.fields(target)
                if f.default is not dataclasses.MISSING}
    return {k: p.default for k, p in inspect.signature(target).parameters.items()
            if p.default is not inspect.Parameter.empty}


def parsed(name: str, args: list[str]) -> dict:
    command = cli.get_command(click.Context(cli), name)
    with command.make_context(name, list(args), resilient_parsing=False) as ctx:
        return ctx.params


def as_parsed(value, default):
    """A comma-separated option ('64,256,256') compared with its tuple field ((64, 256, 256))."""
    if isinstance(default, tuple) and isinstance(value, str):
        kind = type(default[0]) if default else str
        return tuple(kind(v) for v in value.split(","))
    return value


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_cli_defaults_are_the_config_defaults(name: str) -> None:
    args, targets = TARGETS[name]
    params = parsed(name, args)
    renamed = RENAMED.get(name, {})
    checked = 0
    for target in targets:
        for field, default in defaults(target).items():
            cli_name = {v: k for k, v in renamed.items()}.get(field, field)
            if cli_name in params and f"--{cli_name.replace('_', '-')}" not in args:
                value = as_parsed(params[cli_name], default)
                assert value == default, f"{name} --{cli_name}: {value!r} != {default!r}"
                checked += 1
    assert checked >= 1


def test_every_command_is_covered_or_takes_no_config() -> None:
    """A new command with a config shows up here until it is added to TARGETS."""
    without_config = {"info", "verify", "demo", "label", "eval-labeler", "upgrade"}
    assert set(COMMANDS) == set(TARGETS) | without_config


def test_the_check_sees_a_disagreement(monkeypatch) -> None:
    params = parsed("serve", ["."])
    assert params["workers"] == ServeConfig.workers
    option = next(p for p in cli.get_command(click.Context(cli), "serve").params if p.name == "workers")
    monkeypatch.setattr(option, "default", ServeConfig.workers + 1)
    assert parsed("serve", ["."])["workers"] != ServeConfig.workers
