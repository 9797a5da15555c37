"""The stream behind a round trip: `cifar5m serve` behind a delay proxy at several RTTs.

    .venv/bin/python benchmarks/stream_bench.py --latency                # 0, 20, 50 ms
    .venv/bin/python benchmarks/stream_bench.py --latency --rtts 0 20 --pool 200000 --n 20000

One npy pool (synthetic, ``--pool`` samples, shards of 2,000) is served by ``cifar5m serve``
in its own process; for each RTT a ``DelayProxy`` (benchmarks/delay_proxy.py) sits in front
of it, and in this process:

* ideal world: ``--batches`` batches of ``--batch``; img/s after the first batch, and the
  first batch's time (from building the stream);
* real world: the first batch of N=``--n`` (the subset read, then batch 0), its time;

each the best of ``--repeat`` runs, interleaved over the RTTs, after one warm-up run.

Requests are the client chunks the proxy forwarded (one per HTTP request), bytes what it
sent back, both for the whole row (the catalog's manifest and index included).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from delay_proxy import DelayProxy


def pool(work: Path, samples: int) -> Path:
    root = work / f"npy-pool-{samples}"
    if not (root / "manifest.json").exists():
        from cifar5m.shards.synthetic import write_synthetic_dataset

        write_synthetic_dataset(root, n_train=samples, n_test=10, shard_size=2000, image_format="npy")
    return root


def ideal(url: str, batch: int, batches: int) -> tuple[float, float]:
    """(img/s after the first batch, first batch seconds)."""
    from cifar5m.train.stream import SampleStream, StreamConfig

    t0 = time.perf_counter()
    it = iter(SampleStream(StreamConfig(source=url, batch_size=batch, steps=batches)))
    next(it)
    t1 = time.perf_counter()
    n = sum(len(b.labels) for b in it)
    return n / (time.perf_counter() - t1), t1 - t0


def real_first(url: str, batch: int, n: int) -> float:
    from cifar5m.train.stream import SampleStream, StreamConfig

    t0 = time.perf_counter()
    next(iter(SampleStream(StreamConfig(source=url, world="real", n=n, batch_size=batch))))
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> None:
    from stream_bench import start_server

    root = pool(args.work, args.pool)
    proc, pattern = start_server("cifar5m", args.work, [root.name])
    host, port = pattern.split("/")[2].split(":")
    path = "/" + pattern.format(name=root.name).split("/", 3)[3]
    best: dict[float, list] = {}
    try:
        with DelayProxy(host, int(port), rtt=0.0) as proxy:  # warm-up: page cache, server workers
            ideal(proxy.url(path), args.batch, args.batches)
        for _ in range(args.repeat):  # interleaved; per RTT the best ideal and real runs are kept
            for rtt in args.rtts:
                with DelayProxy(host, int(port), rtt=rtt / 1e3) as proxy:
                    rate, first = ideal(proxy.url(path), args.batch, args.batches)
                    ideal_counts = proxy.counts()
                with DelayProxy(host, int(port), rtt=rtt / 1e3) as proxy:
                    real = real_first(proxy.url(path), args.batch, args.n)
                    real_counts = proxy.counts()
                print(f"  {rtt:g} ms: ideal {rate:,.0f} img/s, real first batch {real:.2f} s", file=sys.stderr)
                row = best.setdefault(rtt, [rtt, 0.0, 0.0, {}, math.inf, {}])
                if rate > row[1]:
                    row[1:4] = rate, first, ideal_counts
                if real < row[4]:
                    row[4:6] = real, real_counts
    finally:
        proc.terminate()
        proc.wait()
    rows = list(best.values())
    base = rows[0][1]
    print(f"\nnpy pool of {args.pool:,} samples over `cifar5m serve` behind a delay proxy, batch "
          f"{args.batch}; ideal: {args.batches} batches; real: N={args.n:,}, first batch; best of "
          f"{args.repeat} interleaved runs after a warm-up; "
          f"{os.cpu_count()} CPU cores (shared), load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| RTT | ideal img/s | vs 0 ms | ideal first batch | ideal requests | ideal MB | "
          "real first batch | real requests | real MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rtt, rate, first, ic, real, rc in rows:
        print(f"| {rtt:g} ms | {rate:,.0f} | {rate / base:.2f}x | {first:.2f} s | {ic['requests']:,} | "
              f"{ic['bytes'] / 1e6:,.0f} | {real:.2f} s | {rc['requests']:,} | {rc['bytes'] / 1e6:,.0f} |")
