"""Streaming loader throughput: ours (cifar5m.train.stream) against webdataset, same shards, same run.

    .venv/bin/python benchmarks/stream_bench.py                 # CIFAR-10 (JPEG re-encoded), 20k train
    .venv/bin/python benchmarks/stream_bench.py --samples 50000 --batch 256
    .venv/bin/python benchmarks/stream_bench.py --only-http --repeat 3  # the HTTP table only
    .venv/bin/python benchmarks/stream_bench.py --only-checksums        # what verifying costs
    .venv/bin/python benchmarks/stream_bench.py --scale --gigabytes 30  # cold, larger than RAM
    .venv/bin/python benchmarks/stream_bench.py --latency --batch 512  # behind 0/20/50 ms (stream_latency.py)

Datasets are imported once into --work (PNG and npy shards of 2,000 samples) from the
shared CIFAR-10 copy; when it is missing, synthetic images are used (and the table says
so). Baseline: ``webdataset.WebDataset(urls).decode("rgb8").to_tuple(ext, "cls").batched(B)``,
iterated in this process and through a 2-worker DataLoader. Ours: ``SampleStream`` in the
ideal world (block-shuffled order, exactly-once bookkeeping included), same processes;
PNG is decoded with libspng (imagecodecs) when installed, and one row shows Pillow.
A second table reads over HTTP from 127.0.0.1, the server in its own process
(aiohttp's static files, and ``cifar5m serve``), against ours on the same
local files, in wall-clock images/s (the goal: what one training process receives)
and in images per CPU-second of the client process (``time.process_time``: all its
threads, not the server). A run lasts until the split ends or --seconds (4 s)
have passed, whichever is first (fast rows of ours wrap into new epochs to last that
long); rates exclude the first batch (start-up) for both loaders; each number is the
best of --repeat (2) interleaved runs, since the machine is shared.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cifar5m.dataset_server.launcher import free_port, wait_http  # noqa: E402

HTTP_WINDOW = 4096  # HTTP rows: see Table.http_rows
GPU_RATE = 46_000  # img/s, the sizing anchor for a bf16 ResNet-18 on an H200; our H200 run measured
# 57,807 img/s compute-only at batch 512 (docs/training.md, "GPU")

SERVER = """
import sys
from aiohttp import web
app = web.Application()
app.router.add_static("/", sys.argv[1])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None)
"""


def prepare(work: Path, samples: int, fmt: str, cifar10: Path) -> tuple[Path, str]:
    out = work / f"{fmt}-{samples}"
    if (out / "manifest.json").exists():
        return out, _data_name(cifar10)
    if cifar10.is_file():
        cmd = [sys.executable, "-m", "cifar5m", "import", str(cifar10), "--out", str(out),
               "--image-format", fmt, "--shard-size", "2000", "--limit", str(samples)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        from cifar5m.shards.synthetic import write_synthetic_dataset

        write_synthetic_dataset(out, n_train=samples, n_test=10, shard_size=2000, image_format=fmt)
    return out, _data_name(cifar10)


def _data_name(cifar10: Path) -> str:
    return "CIFAR-10 train (JPEG re-encoded)" if cifar10.is_file() else "synthetic 8x8-block images"


SECONDS = 4.0  # each measurement stops after this long (set by --seconds)


def steady_rates(batches) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU-second of this process) after the first
    batch (worker start-up and first reads excluded, for both loaders alike: a training run
    amortises them), over at most SECONDS. CPU time counts every thread of this process
    but not a server's or DataLoader workers' processes."""
    it = iter(batches)
    next(it)
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for images in it:
        n += len(images)
        if time.perf_counter() - t0 > SECONDS:
            break
    rates = n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)
    del it  # stops DataLoader workers now
    return rates


def steady_rate(batches) -> float:
    """Images per wall-clock second (see ``steady_rates``)."""
    return steady_rates(batches)[0]


def best_of(repeat: int, *measures):
    """Run the measures interleaved ``repeat`` times; the best rate of each. The machine is
    shared, so the best run is the one least disturbed by other jobs, for both sides."""
    best = [0.0] * len(measures)
    for _ in range(repeat):
        for i, measure in enumerate(measures):
            best[i] = max(best[i], measure())
    return best


def rate_wds(root: Path, fmt: str, batch: int, workers: int) -> float:
    import webdataset as wds

    urls = sorted(str(p) for p in root.glob("train-*.tar"))
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8") \
        .to_tuple(fmt, "cls").batched(batch)
    loader = ds if workers == 0 else torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    return steady_rate(images for images, _ in loader)


def rate_torch_loader(source: str, batch: int, workers: int, *, min_samples: int = 0) -> float:
    """The stream as an IterableDataset under a plain torch DataLoader with ``workers`` workers."""
    from cifar5m.train.stream import SampleStream, StreamConfig

    stream = SampleStream(StreamConfig(source=source, batch_size=batch, wrap=True,
                                       steps=max(min_samples, 1) // batch or None))
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return steady_rate(b.images for b in loader)


def rate_ours(source: str, batch: int, workers: int, cache_dir: str | None = None, *,
              min_samples: int = 0, window: int | None = None, cpu: bool = False):
    """Ours over the split; fast paths run ``min_samples`` (wrapping into new epochs) so the
    measurement lasts long enough to mean something. ``cpu``: (wall, per CPU-second)."""
    from cifar5m.train.stream import SampleStream, StreamConfig

    extra = {} if window is None else {"window": window}
    stream = SampleStream(StreamConfig(source=source, batch_size=batch, num_workers=workers,
                                       cache_dir=cache_dir, wrap=True,
                                       steps=max(min_samples, 1) // batch or None, **extra))
    if stream.plan.total_batches * batch < stream.plan.pool_size:  # at least one full pass
        stream = SampleStream(StreamConfig(source=source, batch_size=batch, num_workers=workers,
                                           cache_dir=cache_dir, **extra))
    rates = steady_rates(b.images for b in stream)
    return rates if cpu else rates[0]


def cpu_rate_ours(source: str, batch: int, cache_dir: str | None = None, *, min_samples: int = 0) -> float:
    """Images per CPU-second of ours in this process without threads (prefetch=0), i.e. what
    one dedicated core delivers, whatever else the shared machine runs."""
    from cifar5m.train.stream import SampleStream, StreamConfig

    steps = max(min_samples, 1) // batch or None
    stream = SampleStream(StreamConfig(source=source, batch_size=batch, cache_dir=cache_dir, prefetch=0,
                                       wrap=steps is not None, steps=steps))
    return steady_rates(b.labels for b in stream)[1]


class _Always:
    """A digest that equals every expected value (the checks off, for the benchmark)."""

    def __call__(self, data) -> _Always:
        return self

    def __ne__(self, other) -> bool:
        return False


def pass_rates(source: str, batch: int, *, prefetch: int) -> tuple[float, float]:
    """(img per wall-second, img per CPU-second) over whole passes of fresh ideal-world
    streams, each after its first batch, for SECONDS in all."""
    from cifar5m.train.stream import SampleStream, StreamConfig

    n = wall = cpu = 0.0
    while wall < SECONDS:
        it = iter(SampleStream(StreamConfig(source=source, batch_size=batch, prefetch=prefetch)))
        next(it)
        t0, c0 = time.perf_counter(), time.process_time()
        n += sum(len(b.labels) for b in it)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
    return n / wall, n / max(cpu, 1e-9)


def start_server(kind: str, work: Path, names: list[str]) -> tuple[subprocess.Popen, str]:
    """A static server of ``work/<name>`` in its own process; the URL under which each
    ``<name>`` lies. ``static``: aiohttp's static files (Starlette StaticFiles on uvicorn
    before 2026-12-04); ``cifar5m``:
    ``cifar5m serve`` (aiohttp; file bodies and ranges sent by ``sendfile``) over
    hard links in ``work/serve/bench/<name>`` (it serves ROOT/<org>/<name>/)."""
    port = free_port()
    if kind == "static":
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(work), str(port)])
        pattern = f"http://127.0.0.1:{port}/{{name}}"
    else:
        for name in names:
            dest = work / "serve" / "bench" / name
            dest.mkdir(parents=True, exist_ok=True)
            for f in (work / name).iterdir():
                if f.is_file() and not (dest / f.name).exists():
                    os.link(f, dest / f.name)
        proc = subprocess.Popen([sys.executable, "-m", "cifar5m", "serve", str(work / "serve"),
                                 "--port", str(port), "--no-access-log"], stderr=subprocess.DEVNULL)
        pattern = f"http://127.0.0.1:{port}/datasets/bench/{{name}}/resolve/main"
    wait_http(pattern.format(name=names[0]) + "/manifest.json", proc)
    return proc, pattern


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cifar5m-stream-bench")
    ap.add_argument("--cifar10", type=Path, default=Path(os.environ.get("CIFAR10", "")),
                    help="CIFAR-10 as a JPEG tarball (default: $CIFAR10); synthetic images without it.")
    ap.add_argument("--repeat", type=int, default=2, help="Interleaved runs per row (best kept).")
    ap.add_argument("--seconds", type=float, default=SECONDS, help="Time limit of one run.")
    ap.add_argument("--http-servers", nargs="+", default=["static", "cifar5m"],
                    choices=["static", "cifar5m"], help="Static servers of the HTTP rows.")
    ap.add_argument("--only-http", action="store_true", help="Only the HTTP table.")
    ap.add_argument("--only-dataloader", action="store_true",
                    help="Only the rows of the stream under a torch DataLoader against its own workers.")
    ap.add_argument("--only-checksums", action="store_true",
                    help="Only the cost of the per-member checksums (ours with and without them).")
    ap.add_argument("--min-samples", type=int, default=200_000,
                    help="Fast rows of ours run at least this many samples (new epochs).")
    ap.add_argument("--scale", action="store_true",
                    help="Cold-cache runs of `cifar5m stream` on a large npy dataset (stream_scale.py).")
    ap.add_argument("--gigabytes", type=float, default=0.0,
                    help="--scale: an all-train dataset of about this size; 0: CIFAR-5m's six parts.")
    ap.add_argument("--batches", type=int, default=None,
                    help="Ideal-world batches per run: --scale: 2000 by default, 0: the whole split (one epoch); "
                         "--latency: 200 by default.")
    ap.add_argument("--n", type=int, default=None,
                    help="The real world's subset: --scale 50,000, --latency 20,000 by default.")
    ap.add_argument("--code", help="--scale: run this checkout of the project (e.g. a worktree of an old commit).")
    ap.add_argument("--code-deps", help="--scale: a pip --target folder of packages --code needs (on PYTHONPATH).")
    ap.add_argument("--label", help="--scale: the code's name in the table (default: after, or --code's name).")
    ap.add_argument("--rows", nargs="+", default=["disk", "split", "local-ideal", "local-real", "http-ideal",
                                                  "http-real"],
                    help="--scale: what to measure (also local-first, http-first: one batch, --limit 1).")
    ap.add_argument("--results", help="--scale: append each row as JSON to this file.")
    ap.add_argument("--latency", action="store_true",
                    help="The stream over `cifar5m serve` behind a delay proxy (stream_latency.py); "
                         "--n is the real world's subset there too.")
    ap.add_argument("--rtts", nargs="+", type=float, default=[0, 20, 50], help="--latency: round trips, ms.")
    ap.add_argument("--pool", type=int, default=200_000, help="--latency: npy samples served.")
    return ap.parse_args()


class Table:
    """The rows of the result table: (case, baseline name, baseline img/s, ours img/s)."""

    def __init__(self, args: argparse.Namespace, roots: dict[str, Path], cache: Path) -> None:
        self.args, self.roots, self.cache = args, roots, cache
        self.rows: list[tuple[str, str, float, float]] = []
        self.http: list[tuple[str, float, float, float, float]] = []  # local wall, cpu; HTTP wall, cpu

    def fast(self, fmt: str) -> int:
        return self.args.min_samples if fmt == "npy" else 0

    def add(self, case: str, base_name: str, base: float, ours: float) -> None:
        self.rows.append((case, base_name, base, ours))
        print(f"  {case}: {base:,.0f} vs {ours:,.0f} img/s", file=sys.stderr)

    def shard_rows(self) -> None:
        """Both loaders on PNG and npy shards, in one process and with 2 workers."""
        roots, batch, rep = self.roots, self.args.batch, self.args.repeat
        for fmt in ("png", "npy"):
            for workers in (0, 2):
                where = "1 process" if workers == 0 else "DataLoader, 2 workers"
                self.add(f"{fmt} shards, {where}", "webdataset", *best_of(
                    rep, lambda f=fmt, w=workers: rate_wds(roots[f], f, batch, w),
                    lambda f=fmt, w=workers: rate_ours(str(roots[f]), batch, w,
                                                       min_samples=self.fast(f))))
        import cifar5m.shards.codec

        if cifar5m.shards.codec._spng is not None:  # the same row with Pillow, to show what libspng adds
            spng, cifar5m.shards.codec._spng = cifar5m.shards.codec._spng, None
            try:
                self.add("png shards, 1 process, ours with Pillow", "webdataset", *best_of(
                    rep, lambda: rate_wds(roots["png"], "png", batch, 0),
                    lambda: rate_ours(str(roots["png"]), batch, 0)))
            finally:
                cifar5m.shards.codec._spng = spng

    def dataloader_rows(self) -> None:
        """The stream under a torch DataLoader's 2 workers against its own 2 workers."""
        roots, batch, rep = self.roots, self.args.batch, self.args.repeat
        for fmt in ("png", "npy"):
            self.add(f"{fmt} shards, 2 workers: torch DataLoader over the stream vs its own",
                     "ours, StreamConfig(num_workers=2)", *best_of(
                         rep, lambda f=fmt: rate_ours(str(roots[f]), batch, 2, min_samples=self.fast(f)),
                         lambda f=fmt: rate_torch_loader(str(roots[f]), batch, 2, min_samples=self.fast(f))))

    def cache_rows(self) -> None:
        """Ours from the warm decoded cache against webdataset on PNG."""
        png, batch, cache = self.roots["png"], self.args.batch, str(self.cache)
        rate_ours(str(png), batch, 0, cache)  # fill the decoded cache once
        for workers in (0, 2):
            where = "1 process" if workers == 0 else "DataLoader, 2 workers"
            self.add(f"decoded cache (warm), {where}", "webdataset png", *best_of(
                self.args.repeat, lambda w=workers: rate_wds(png, "png", batch, w),
                lambda w=workers: rate_ours(str(png), batch, w, cache,
                                            min_samples=self.args.min_samples)))

    def http_rows(self) -> None:
        """Ours over HTTP from 127.0.0.1 against ours on the same local files, per server.

        Window 4096 on both sides: the block store keeps 2 windows of blocks (8,192
        samples), less than the split, so every epoch fetches every block again over HTTP
        as a run over a dataset bigger than the store does (with the default window of
        16,384 a 20k split stays in the store after the first epoch and the rows would
        measure memory, not HTTP)."""
        roots, batch, a = self.roots, self.args.batch, self.args
        for kind in a.http_servers:
            proc, pattern = start_server(kind, a.work, [roots[f].name for f in ("png", "npy")])
            try:
                for fmt in ("png", "npy"):
                    best = [(0.0, 0.0), (0.0, 0.0)]
                    for _ in range(a.repeat):  # interleaved; the best wall-clock run of each
                        for i, src in enumerate((str(roots[fmt]), pattern.format(name=roots[fmt].name))):
                            got = rate_ours(src, batch, 0, min_samples=self.fast(fmt), window=HTTP_WINDOW,
                                            cpu=True)
                            best[i] = max(best[i], got)
                    self.http.append((f"{fmt}, {kind} server", *best[0], *best[1]))
                    print(f"  HTTP {fmt} {kind}: {best[0][0]:,.0f} vs {best[1][0]:,.0f} img/s", file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait()

    def checksum_rows(self) -> None:
        """Ours with the per-member/group XXH3 checks and with them turned into no-ops (the
        code before them), local shards, 1 process, interleaved. Every pass is a fresh
        stream (a process checks each group once, so later epochs of one stream would
        measure nothing); wall-clock img/s with the prefetch thread, and img/s per
        CPU-second of one thread (prefetch=0, steadier on a shared box)."""
        import cifar5m.shards.checksum as checksum

        real = checksum.first_bad, checksum.first_bad_at, checksum.digest

        def unchecked(measure):
            def run():
                checksum.first_bad = checksum.first_bad_at = lambda *a, **k: -1
                checksum.digest = _Always()
                try:
                    return measure()
                finally:
                    checksum.first_bad, checksum.first_bad_at, checksum.digest = real
            return run

        batch, rep = self.args.batch, self.args.repeat
        self.checks = []
        for fmt in ("npy", "png"):
            src = str(self.roots[fmt])
            wall = best_of(rep, unchecked(lambda s=src: pass_rates(s, batch, prefetch=2)[0]),
                           lambda s=src: pass_rates(s, batch, prefetch=2)[0])
            cpu = best_of(rep, unchecked(lambda s=src: pass_rates(s, batch, prefetch=0)[1]),
                          lambda s=src: pass_rates(s, batch, prefetch=0)[1])
            self.checks.append((f"{fmt} shards, local, 1 process", *wall, *cpu))
            print(f"  checksums {fmt}: {wall[0]:,.0f} vs {wall[1]:,.0f} img/s", file=sys.stderr)
        proc, pattern = start_server("static", self.args.work, [self.roots["npy"].name])
        try:  # remote npy blocks are checked on arrival (one digest per group of 64)
            url = pattern.format(name=self.roots["npy"].name)
            wall = best_of(rep, unchecked(lambda: pass_rates(url, batch, prefetch=2)[0]),
                           lambda: pass_rates(url, batch, prefetch=2)[0])
            cpu = best_of(rep, unchecked(lambda: pass_rates(url, batch, prefetch=0)[1]),
                          lambda: pass_rates(url, batch, prefetch=0)[1])
            self.checks.append(("npy shards, HTTP (aiohttp static files, 127.0.0.1), 1 process", *wall, *cpu))
        finally:
            proc.terminate()
            proc.wait()

    def print_checksums(self) -> None:
        print("\nCost of verifying every member's XXH3 on read (ours, local shards): the same code "
              "with the checks replaced by no-ops (before) and as shipped (after). Goal: <= 5% of "
              "the local npy rate.\n")
        print("| case | before img/s | after img/s | cost (wall) | before img/CPU-s | after img/CPU-s | cost (CPU) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for case, wb, wa, cb, ca in self.checks:
            print(f"| {case} | {wb:,.0f} | {wa:,.0f} | {1 - wa / wb:.1%} | {cb:,.0f} | {ca:,.0f} | "
                  f"{1 - ca / cb:.1%} |")

    def print_http(self) -> None:
        print(f"\nOurs over HTTP from 127.0.0.1 (server in its own process) against ours on the same "
              f"local files, 1 process, window {HTTP_WINDOW} (every block fetched every epoch). Goal "
              f"(wall-clock): HTTP >= 0.8x local. img/CPU-s: images per CPU-second of the client "
              f"process (all its threads; the server's CPU not counted).\n")
        print("| case | local img/s | HTTP img/s | ratio (wall, goal) | local img/CPU-s | HTTP img/CPU-s | ratio (CPU) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for case, lw, lc, hw, hc in self.http:
            print(f"| {case} | {lw:,.0f} | {hw:,.0f} | {hw / lw:.2f}x | {lc:,.0f} | {hc:,.0f} | {hc / lc:.2f}x |")

    def print(self, data: str) -> None:
        a = self.args
        print(f"\n{data}, {a.samples:,} samples, batch {a.batch}, {os.cpu_count()} CPU cores "
              f"(shared), torch {torch.__version__}; best of {a.repeat} interleaved runs of <= "
              f"{SECONDS:.0f} s each; load average {os.getloadavg()[0]:.1f} at the end\n")
        print("| case | baseline | baseline img/s | ours img/s | ratio |")
        print("|---|---|---:|---:|---:|")
        for case, base_name, base, ours in self.rows:
            print(f"| {case} | {base_name} | {base:,.0f} | {ours:,.0f} | {ours / base:.2f}x |")

    def print_cores(self) -> None:
        """How many cores of ours feed the GPU, from one thread's images per CPU-second."""
        print(f"\nCores of ours to feed {GPU_RATE:,} img/s (bf16 ResNet-18, H200), from images per "
              f"CPU-second of one thread (prefetch=0, no workers):")
        png, npy, minimum = str(self.roots["png"]), str(self.roots["npy"]), self.args.min_samples
        for name, source, cache_dir, least in (("png shards", png, None, 0),
                                               ("npy shards", npy, None, minimum),
                                               ("decoded cache", png, str(self.cache), minimum)):
            per_core = max(cpu_rate_ours(source, self.args.batch, cache_dir, min_samples=least)
                           for _ in range(self.args.repeat))
            print(f"  {name}: {per_core:,.0f} img/s per core -> {math.ceil(GPU_RATE / per_core)} core(s)")


def main() -> None:
    global SECONDS
    args = parse_args()
    SECONDS = args.seconds
    if args.scale or args.latency:
        sys.path.insert(0, str(Path(__file__).parent))
        from stream_latency import run as latency
        from stream_scale import run
        if args.latency:
            run = latency
            args.batches, args.n = args.batches or 200, args.n or 20_000
        else:
            args.batches = 2000 if args.batches is None else args.batches
            args.n = args.n or 50_000

        args.work.mkdir(parents=True, exist_ok=True)
        return run(args)
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    roots = {}
    for fmt in ("png", "npy"):
        roots[fmt], data = prepare(args.work, args.samples, fmt, args.cifar10)
    logging.getLogger("cifar5m.stream").setLevel(logging.ERROR)  # wrap=True warns by design
    table = Table(args, roots, args.work / f"cache-{args.samples}")
    if args.only_checksums:
        table.checksum_rows()
        print(f"\n{data}, {args.samples:,} samples, batch {args.batch}, {os.cpu_count()} CPU cores "
              f"(shared), best of {args.repeat} interleaved runs of <= {SECONDS:.0f} s each; load "
              f"average {os.getloadavg()[0]:.1f} at the end")
        table.print_checksums()
        return
    if args.only_dataloader:
        table.dataloader_rows()
        return table.print(data)
    if not args.only_http:
        table.shard_rows()
        table.dataloader_rows()
        table.cache_rows()
    table.http_rows()
    if not args.only_http:
        table.print(data)
    table.print_http()
    if not args.only_http:
        table.print_cores()


if __name__ == "__main__":
    main()
