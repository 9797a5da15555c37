"""What ``cifar5m stream`` does: measure a stream and check it, or write it as a tar.

The exactly-once check compares what this rank was handed with the plan (the same
positions, batch by batch) and checks the plan itself over all ranks of the world for
the delivered batches: no position twice (ideal world), or no position twice within
an epoch (real world). The plan check costs no I/O, so it covers every rank.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from cifar5m.cli.stream_tar import TarStreamWriter
from cifar5m.train.stream import SampleStream


def _plan_check(stream: SampleStream, first: int, stop: int) -> dict[str, Any]:
    """Duplicates among all ranks' positions of global batches ``[first, stop)``."""
    if stop <= first:
        return {"global_samples": 0, "global_distinct": 0, "global_repeats_within_epoch": 0}
    plan = stream.plan
    items = plan.items(first * plan.batch_size, stop * plan.batch_size)
    epochs = (np.arange(first * plan.batch_size, stop * plan.batch_size) // plan.pool_size)
    repeats = 0
    for e in np.unique(epochs):
        chunk = items[epochs == e]
        repeats += len(chunk) - len(np.unique(chunk))
    return {"global_samples": len(items), "global_distinct": len(np.unique(items)),
            "global_repeats_within_epoch": int(repeats)}


def _positions_of(stream: SampleStream, keys: list[str], strangers: set[str]) -> np.ndarray:
    """Split positions of the keys of an off-plan batch; keys the split does not hold go to
    ``strangers``."""
    found = []
    for key in keys:
        position = stream.catalog.position(key)
        if position is None:
            strangers.add(key)
        else:
            found.append(position)
    return np.asarray(found, dtype=np.int64)


def process_age() -> float | None:
    """Seconds since this process started (Linux: its start time in /proc against
    CLOCK_BOOTTIME, 10 ms resolution), or None where that is not available."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError, IndexError):
        return None


def run_stats(stream: SampleStream, *, limit: int | None, progress: bool = True,
              on_batch: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Iterate (up to ``limit`` batches), time it and check exactly-once; a result dict.

    ``on_batch`` runs after each batch is handed over (the command saves the state there
    every N batches); when it returns True the run stops at this batch boundary."""
    start_batch = stream.next_batch
    total = len(stream) if limit is None else min(limit, len(stream))
    producer = stream._producer()
    # Distinct delivered samples: one flag per split position (1 byte a sample: 5 MB at 5M,
    # where a list and a set of every delivered key took ~600 MB); keys of an off-plan batch
    # are looked up, and any the split does not hold are kept by name (none in a sound run).
    seen = np.zeros(len(stream.catalog), dtype=bool)
    strangers: set[str] = set()
    delivered = mismatched = 0
    t0 = time.perf_counter()
    age = process_age()  # the set-up so far: imports, catalog, plan, sources
    first_latency = None
    with tqdm(total=total * stream.plan.per_rank, unit="img", unit_scale=True, disable=not progress,
              file=sys.stderr, desc="stream") as bar:  # closed (its line ended) before any error
        for i, batch in enumerate(stream):
            if first_latency is None:
                first_latency = time.perf_counter() - t0
            positions = producer.positions(batch.step)
            if batch.keys != stream.catalog.key_list(positions):
                mismatched += 1
                positions = _positions_of(stream, batch.keys, strangers)
            seen[positions] = True
            delivered += len(batch.keys)
            bar.update(len(batch.keys))
            if i + 1 >= total or (on_batch is not None and on_batch()):
                break
    wall = time.perf_counter() - t0
    report = stream.report()
    report.update({
        "wall_s": round(wall, 3), "first_batch_s": round(first_latency or 0.0, 3),
        "first_batch_from_start_s": None if age is None else round(age + (first_latency or 0.0), 3),
        "images_per_s": round(delivered / wall, 1) if wall > 0 else 0.0,
        "rank_samples": delivered, "rank_distinct": int(np.count_nonzero(seen)) + len(strangers),
        "batches_off_plan": int(mismatched),
        **_plan_check(stream, start_batch, stream.next_batch),
    })
    ideal = stream.config.world == "ideal" and not report["wrapped"]
    report["exactly_once"] = bool(
        mismatched == 0 and report["global_repeats_within_epoch"] == 0
        and (not ideal or report["rank_distinct"] == report["rank_samples"]))
    return report


def _first_batch(r: dict[str, Any]) -> str:
    if r.get("first_batch_from_start_s") is None:
        return f"after {r['first_batch_s']:.2f} s"
    return (f"after {r['first_batch_from_start_s']:.2f} s from process start, set-up included; "
            f"{r['first_batch_s']:.2f} s after set-up")


def format_stats(r: dict[str, Any]) -> str:
    lines = [
        f"stream: {r['world']} world, {r['source']} split {r['split']} ({r['split_size']:,} samples, "
        f"pool {r['pool_size']:,}), rank {r['rank']}/{r['world_size']}, global batch "
        f"{r['batch_size']} ({r['per_rank_batch']} per rank), {r['num_workers']} workers",
        f"delivered: {r['delivered_batches']:,} batches, {r['rank_samples']:,} images in {r['wall_s']:.2f} s "
        f"= {r['images_per_s']:,.0f} images/s (first batch {_first_batch(r)})",
        f"exactly-once: {'OK' if r['exactly_once'] else 'FAILED'}; this rank {r['rank_distinct']:,} "
        f"distinct of {r['rank_samples']:,}, {r['batches_off_plan']} batches off the plan; all "
        f"{r['world_size']} ranks: {r['global_distinct']:,} distinct of {r['global_samples']:,}, "
        f"{r['global_repeats_within_epoch']} repeats within an epoch",
        f"run: {r['total_batches']:,} batches per rank, resumed from {r['resumed_from']}, next "
        f"{r['next_batch']}, epochs {r['epochs']:.3f}, dropped tail {r['dropped_tail']:,} samples, "
        f"wrapped: {'yes' if r['wrapped'] else 'no'}",
    ]
    return "\n".join(lines)


def write_tar(stream: SampleStream, out: BinaryIO, *, limit: int | None,
              on_batch: Callable[[], bool] | None = None) -> int:
    """Write this rank's samples as a WebDataset tar; returns the number of samples.

    A batch counts as delivered (``stream.delivered``) only after it is written and
    ``out`` is flushed, so a state saved at any moment covers exactly the batches that
    left this process. ``on_batch`` runs after each such batch (the command saves the
    state there every N batches); when it returns True the tar is ended at this batch
    boundary (a SIGTERM was received). Real-world keys get ``_<epoch>`` appended: a
    subset key recurs every epoch and webdataset would merge two adjacent samples with
    one key.
    """
    writer = TarStreamWriter(out)
    ext = stream.catalog.image_format
    real = stream.config.world == "real"
    plan = stream.plan
    for b, positions in itertools.islice(stream.iter_positions(advance=False), limit):
        keys = stream.catalog.key_list(positions)
        if real:
            epochs = (plan.rank_start(b, stream.rank) + np.arange(len(keys))) // plan.pool_size
            keys = [f"{k}_{e}" for k, e in zip(keys, epochs.tolist(), strict=True)]
        raws = stream.reader.raw(positions)
        writer.write_batch(keys, raws, stream.catalog.labels[positions].tolist(), ext)
        out.flush()
        stream.delivered(b)
        if on_batch is not None and on_batch():
            break
    writer.close()
    return writer.samples
