"""The ``cifar5m`` command line.

Commands are registered by name and imported only when run, so ``cifar5m serve``
never imports torch and ``cifar5m --help`` starts instantly. Each command module
under ``cifar5m/commands/`` in turn imports its stage inside the command body.
Errors are turned into one ``Error: ...`` line here, and nowhere else.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import os
import sys

import click

from cifar5m.core.errors import Cifar5mError
from cifar5m.core.version import __version__

# name -> "module:attribute"; one line per command, grouped by stage.
COMMANDS: dict[str, str] = {
    # shards/
    "import": "cifar5m.cli.dataset:import_cmd",
    "verify": "cifar5m.cli.dataset:verify_cmd",
    "info": "cifar5m.cli.dataset:info_cmd",
    "grid": "cifar5m.cli.dataset:grid_cmd",
    "upgrade": "cifar5m.cli.dataset:upgrade_cmd",
    "demo": "cifar5m.cli.demo:demo_cmd",
    # generator/
    "generate": "cifar5m.cli.generate:generate_cmd",
    "train-labeler": "cifar5m.cli.generator_models:train_labeler_cmd",
    "train-generator": "cifar5m.cli.generator_models:train_generator_cmd",
    "report": "cifar5m.cli.generator_models:report_cmd",
    "label": "cifar5m.cli.label:label_cmd",
    "eval-labeler": "cifar5m.cli.label:eval_labeler_cmd",
    # dataset_server/
    "serve": "cifar5m.cli.serve:serve_cmd",
    "download": "cifar5m.cli.serve:download_cmd",
    # train/
    "train": "cifar5m.cli.train:train_cmd",
    "bootstrap": "cifar5m.cli.train:bootstrap_cmd",
    "stream": "cifar5m.cli.streaming:stream_cmd",
}


# What a command needs beyond the base install: (the extra that brings it, its modules). The
# check runs before the command, so a missing extra is one line, not a traceback from a worker.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "generate": ("generate", ("torch", "diffusers")),
    "train-labeler": ("generate", ("torch",)),
    "train-generator": ("generate", ("torch", "diffusers")),
    "report": ("generate", ("torch",)),
    "label": ("generate", ("torch",)),
    "eval-labeler": ("generate", ("torch",)),
    "serve": ("serve", ("aiohttp",)),
    "download": ("serve", ("huggingface_hub",)),
    "train": ("train", ("torch",)),
    "bootstrap": ("train", ("torch",)),
    "stream": ("train", ("torch",)),
    "demo": ("all", ("torch", "diffusers", "aiohttp")),
}


def missing_extra(name: str) -> str | None:
    """The one-line error for command ``name`` when a module of its extra is not installed."""
    extra, modules = EXTRAS.get(name, ("", ()))
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or blocked install counts as missing
            found = False
        if not found:
            return f"cifar5m {name} needs the {extra} extra ({module} is not installed): pip install 'cifar5m[{extra}]'"
    return None


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        problem = None if {"-h", "--help"} & set(rest) else missing_extra(name or "")
        if problem:
            raise click.ClickException(problem)
        return name, command, rest

    def invoke(self, ctx: click.Context) -> object:
        # The one place where project errors become `Error: ...` and exit status 1
        # (click prints a ClickException as "Error: <message>").
        try:
            return super().invoke(ctx)
        except Cifar5mError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cifar5m")
def cli() -> None:
    """Make, serve and use CIFAR-5m-scale synthetic datasets.

    \b
    Example:
      cifar5m import cifar10-jpeg.tar.gz --out data/cifar10
      cifar5m info data/cifar10
    """


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    try:
        cli.main(args=argv, prog_name="cifar5m")
    except KeyboardInterrupt:
        click.echo("Interrupted; re-run the same command to resume.", err=True)
        sys.exit(130)


def run() -> None:
    """The ``cifar5m`` command: ``main``, then an exit that skips native static destructors.

    A finished command now and then aborted at interpreter teardown with "terminate called
    without an active exception" (exit -6 after a successful import, generate or torchrun
    rank: 4 times in about 14 full test suites, each of which runs the CLI some hundreds of
    times): a C++ thread pool torn down with a live thread, as pyarrow's parquet threads are
    reported to do (apache/arrow#34314). The interpreter's own exit work still runs (threads
    joined, every atexit handler: logging, multiprocessing, torch.distributed); ``_leave`` is
    registered first, so it runs last, and ends the process before native teardown.
    """
    status: list[int] = [0]
    atexit.register(_leave, status)
    try:
        main()
    except SystemExit as exc:
        status[0] = 1 if isinstance(exc.code, str) else (exc.code or 0)
        raise
    except BaseException:  # a traceback: printed by the interpreter, then status 1
        status[0] = 1
        raise


def _leave(status: list[int]) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a reader that went away
            stream.flush()
    os._exit(status[0])


if __name__ == "__main__":
    run()
