"""A command whose extra is not installed says which one to install, in one line, before it
starts anything (the module is hidden in a subprocess, as if the extra were left out)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cifar5m.cli.main import COMMANDS, EXTRAS

HIDE = r'''
import sys, importlib.abc
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {module!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Hide())
from cifar5m.cli.main import run
sys.argv = ["cifar5m", *{args!r}]
run()
'''


def run_hidden(module: str, args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE.format(module=module, args=args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("args", "module", "extra"), [
    (["serve", "."], "aiohttp", "serve"),
    (["download", "lab/ds"], "huggingface_hub", "serve"),
    (["generate", "--count", "10", "--out", "x"], "diffusers", "generate"),
    (["label", ".", "--labeler", "builtin"], "torch", "generate"),
    (["train", "--data", ".", "--world", "ideal", "--out", "x"], "torch", "train"),
    (["stream", "."], "torch", "train"),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, args, module, extra) -> None:
    done = run_hidden(module, args, tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"Error: cifar5m {args[0]} needs the {extra} extra ({module} is not installed): "
        f"pip install 'cifar5m[{extra}]'"]
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def test_help_still_works_without_the_extra(tmp_path) -> None:
    done = run_hidden("aiohttp", ["serve", "--help"], tmp_path)
    assert done.returncode == 0 and "Usage: cifar5m serve" in done.stdout


def test_every_extra_named_exists_and_every_command_is_known() -> None:
    from pathlib import Path

    import tomllib

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {extra for extra, _ in EXTRAS.values()} <= set(extras)
    assert set(EXTRAS) <= set(COMMANDS)
