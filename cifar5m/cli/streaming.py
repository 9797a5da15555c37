"""``cifar5m stream``: measure and check the training loader, or pipe it as a tar."""

from __future__ import annotations

import json
import signal
import sys

import click

from cifar5m.cli.options import config_option, parse_size, storage_options_option
from cifar5m.train.config import StreamConfig


@click.command("stream")
@click.argument("source")
@config_option(StreamConfig, "world", type=click.Choice(["ideal", "real"]),
               help="ideal: every sample at most once; real: epochs over a fixed subset of --n.")
@config_option(StreamConfig, "n", type=click.IntRange(min=1), help="Real world: subset size.")
@config_option(StreamConfig, "batch_size", type=click.IntRange(min=1),
               help="GLOBAL batch size (all ranks together).")
@config_option(StreamConfig, "steps", type=click.IntRange(min=0),
               help="Global batches of the run (default: ideal = all the split allows, real = 1 epoch).")
@config_option(StreamConfig, "seed", type=click.IntRange(min=0))
@config_option(StreamConfig, "split")
@config_option(StreamConfig, "rank", type=click.IntRange(min=0),
               help="Default: torch.distributed, $RANK, else 0.")
@config_option(StreamConfig, "world_size", type=click.IntRange(min=1),
               help="Default: torch.distributed, $WORLD_SIZE, else 1.")
@config_option(StreamConfig, "num_workers", "--workers", type=click.IntRange(min=0),
               help="DataLoader worker processes (stats mode).")
@config_option(StreamConfig, "class_balanced", is_flag=True, help="Real world: equal samples per class.")
@config_option(StreamConfig, "wrap", is_flag=True, help="Ideal world: repeat the split instead of failing.")
@config_option(StreamConfig, "cache_dir", type=click.Path(file_okay=False),
               help="Decoded-shard cache directory.")
@click.option("--cache-bytes", "cache_bytes", callback=lambda _c, _p, v: parse_size(v),
              help="Size cap of --cache-dir, e.g. 20G (LRU eviction).")
@click.option("--limit", type=click.IntRange(min=0), help="Stop after this many batches of this rank.")
@click.option("--format", "fmt", type=click.Choice(["stats", "tar"]), default="stats", show_default=True,
              help="stats: throughput, counts and the exactly-once check; tar: WebDataset tar on stdout.")
@click.option("--json", "as_json", is_flag=True, help="stats: print the result as JSON.")
@storage_options_option()
@click.option("--state", "state_path", type=click.Path(dir_okay=False),
              help="Resume from this state file if it exists; save the state there (atomically) "
                   "every --state-every batches, on SIGTERM and at the end.")
@click.option("--state-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Save --state after every this many delivered batches: after a SIGKILL at "
                   "most this many batches of this rank are delivered again.")
def stream_cmd(source: str, limit: int | None, fmt: str, as_json: bool, state_path: str | None,
               state_every: int, **fields) -> None:
    """Stream the training batches of a dataset exactly once per rank (what training sees).

    SOURCE is a dataset directory, an http(s) URL of one (any static server or
    `cifar5m serve`) or an fsspec URL (s3://, gs://). The order is fixed by --seed;
    every rank gets the same number of batches; --state resumes exactly.
    With --format tar a batch counts as delivered once it is written and flushed;
    SIGTERM ends the tar at the next batch boundary, saves --state and exits 143.
    --state is written atomically every --state-every delivered batches in both
    formats: a resume after SIGKILL delivers again at most --state-every batches of
    this rank, after SIGTERM none.
    See docs/streaming.md for what a pipe guarantees when the reader dies.

    \b
    Examples:
      cifar5m stream data/cifar5m --batch-size 512 --limit 200
      # from `cifar5m serve data --port 8000`, which serves data/lab/cifar5m as lab/cifar5m
      cifar5m stream http://127.0.0.1:8000/datasets/lab/cifar5m/resolve/main \\
          --world real --n 50000 --steps 1000
      cifar5m stream data/cifar5m --rank 1 --world-size 4 --format tar > rank1.tar
    \b
    In a training job (webdataset):
      webdataset.WebDataset("pipe:cifar5m stream data/cifar5m --format tar")
    """
    from pathlib import Path

    from cifar5m.cli.stream_check import format_stats, run_stats, write_tar
    from cifar5m.train.stream import SampleStream

    if fmt != "stats":
        fields["num_workers"] = 0
    config = StreamConfig(source=source, return_keys=True, **fields)
    stream = SampleStream(config)
    state_file = Path(state_path) if state_path else None
    if state_file is not None and state_file.is_file():
        stream.load_state_dict(json.loads(state_file.read_text()))

    def save() -> None:
        if state_file is not None:
            from cifar5m.core.atomic import atomic_write_bytes

            atomic_write_bytes(state_file, json.dumps(stream.state_dict()).encode())

    terminated: list[int] = []

    def on_signal(signum: int, _frame) -> None:
        if fmt != "tar":  # stats: stop now; the state counts batches handed over
            raise SystemExit(128 + signum)
        terminated.append(signum)  # tar: finish the batch being written, then stop

    flushed = [0]

    def on_batch() -> bool:
        flushed[0] += 1
        if flushed[0] % state_every == 0:
            save()
        return bool(terminated)

    previous = signal.signal(signal.SIGTERM, on_signal)
    result = None
    try:
        if fmt == "tar":
            write_tar(stream, sys.stdout.buffer, limit=limit, on_batch=on_batch)
        else:
            result = run_stats(stream, limit=limit, on_batch=on_batch)
            click.echo(json.dumps(result, indent=1) if as_json else format_stats(result))
    except BrokenPipeError:  # the reader (e.g. webdataset) stopped early: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no 2nd error at exit
    finally:
        signal.signal(signal.SIGTERM, previous)
        save()  # exact: only batches written and flushed (tar) or handed over (stats) count
    if terminated:
        raise SystemExit(128 + terminated[0])
    if result is not None and not result["exactly_once"]:
        raise SystemExit(1)
