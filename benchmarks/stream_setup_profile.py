"""Where `cifar5m stream`'s set-up goes at scale: time and RSS of each phase, cold.

    .venv/bin/python benchmarks/stream_setup_profile.py /work/scale/cifar5m-6parts-npy [--world real --n 50000]

Phases, as ``SampleStream.__init__`` and ``run_stats`` do them: imports, open_source,
Catalog.load (manifest + whole index read, filter/sort, per-position arrays, keys), the
real world's subset, Plan, SampleReader, the first epoch order, the first batch. Each line:
seconds, RSS after (/proc/self/status), peak RSS so far (ru_maxrss). ``--trace`` also prints the
top tracemalloc sites of Catalog.load (slower). Evict the dataset's page cache before
(stream_scale.evict) for cold figures.
"""

from __future__ import annotations

import argparse
import resource
import time

T0 = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("--world", default="ideal")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--trace", action="store_true")
    args = ap.parse_args()
    last = [T0]

    def rss() -> float:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) * 1024

    def phase(name: str) -> None:
        now = time.perf_counter()
        print(f"{name:<34} {now - last[0]:7.2f} s  rss {rss() / 1e6:7.0f} MB  "
              f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:7.0f} MB", flush=True)
        last[0] = now

    import numpy as np  # noqa: F401

    from cifar5m.shards.catalog import Catalog
    from cifar5m.shards.source import open_source
    from cifar5m.train.order import Plan, choose_subset
    from cifar5m.train.sample_reader import SampleReader
    from cifar5m.train.stream import SampleStream, StreamConfig  # noqa: F401
    phase("imports (cifar5m.train.stream, torch)")
    source = open_source(args.source)
    phase("open_source")
    if args.trace:
        import tracemalloc

        tracemalloc.start()
    catalog = Catalog.load(source, "train")
    phase(f"Catalog.load ({len(catalog):,} rows)")
    if args.trace:
        snap = tracemalloc.take_snapshot()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"  tracemalloc peak during Catalog.load: {peak / 1e6:,.0f} MB; held after, by line:")
        for stat in snap.statistics("lineno")[:8]:
            print(f"    {stat.size / 1e6:8.1f} MB  {stat.traceback[0]}")
    sizes = {k: v.nbytes for k, v in vars(catalog).items() if hasattr(v, "nbytes")}
    print("  catalog arrays:", ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sizes.items()),
          f"(total {sum(sizes.values()) / 1e6:.0f} MB)")
    subset = None
    if args.world == "real":
        subset = choose_subset(catalog.labels, args.n, seed=0, class_balanced=False, num_classes=10, where="")
        phase("choose_subset")
    pool = len(catalog) if subset is None else len(subset)
    plan = Plan(pool_size=pool, batch_size=args.batch, world_size=1, total_batches=pool // args.batch, seed=0,
                counts=catalog.shard_count if subset is None else None)
    phase("Plan")
    reader = SampleReader(catalog, source, None, block=256 if subset is None else None, keep_blocks=128)
    phase("SampleReader")
    plan.epoch_order(0)
    phase("first epoch order")
    positions = plan.rank_batch(0, 0) if subset is None else subset
    if subset is None:
        reader.lookahead(plan.rank_batch(1, 0))
        reader.lookahead(plan.rank_batch(4, 0))
    reader.images(positions)
    phase("first batch (real: the whole subset)" if subset is not None else "first batch")
    catalog.key_list(positions)
    phase("keys of the first batch")


if __name__ == "__main__":
    main()
