"""Load test of ``cifar5m serve`` against ``python -m http.server`` on the same files.

Loopback only, bounded by ``--seconds`` per server and ``--max-requests`` per client.
``--clients`` concurrent clients (asyncio tasks on raw HTTP/1.1 keep-alive sockets in
``--client-procs`` processes, see ``serve_load.py``; the same client and the same seeded
request sequence for every server) download random whole shards and random byte ranges
(up to 1 MiB) of a dataset written with the real writer, and compare every byte asked
for with the file. http.server ignores Range, so a range costs it the whole shard; the
client checks the slice it asked for. "MB/s" counts the bytes the clients asked for.
Our API endpoints (info, tree, paths-info, HEAD) are sampled between downloads and
their p99 latency reported; http.server only has HEAD.

CPU: utime+stime of the server's process tree (all workers and threads) and of the
client processes over the load, and the whole machine's busy time from /proc/stat;
"server CPU-s/GB" (per GB asked for) does not depend on how the cores are shared.

    python benchmarks/serve_bench.py --seconds 60 --clients 32

Our server runs once per ``--servers`` (granian, uvicorn) and ``--workers`` value.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from dataset_server.engines import ENGINES  # noqa: E402
from serve_load import REPO, box_busy_s, children_cpu_s, client_proc, tree_cpu_s, wait_idle  # noqa: E402

from tests.conftest import write_dataset  # noqa: E402
from tests.test_server_support import free_port, wait_http  # noqa: E402


def start_server(kind: str, root: Path, workers: int, loop: str = "auto",
                 engine: str = "granian") -> tuple[subprocess.Popen, int, str]:
    port = free_port()
    if kind == "http.server":
        cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
               "--directory", str(root / REPO)]
        prefix = ""
    else:
        cmd = [sys.executable, "-m", "cifar5m", "serve", str(root), "--port", str(port),
               "--workers", str(workers), "--loop", loop, "--server", engine, "--no-access-log"]
        prefix = f"/datasets/{REPO}/resolve/main"
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}{prefix}/manifest.json", proc, seconds=60)
    return proc, port, prefix


def run_load(files: dict[str, bytes], proc: subprocess.Popen, port: int, prefix: str, ours: bool,
             args) -> dict:
    """Run the clients against one server; throughput, latency and where the CPU went."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    per = [args.clients // args.client_procs + (i < args.clients % args.client_procs)
           for i in range(args.client_procs)]
    procs = [ctx.Process(target=client_proc, args=(files, port, prefix, ours, args, n, i, queue))
             for i, n in enumerate(per)]
    wait_idle(proc.pid)
    cpu0 = (tree_cpu_s(proc.pid), children_cpu_s(), box_busy_s())
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [s for _ in procs for s in queue.get()]
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    cpu1 = (tree_cpu_s(proc.pid), children_cpu_s(), box_busy_s())
    server_s, client_s, box_s = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    lat = np.array([x for s in results for x in s.lat] or [0.0])
    api = np.array([x for s in results for x in s.api] or [0.0])
    total = {k: sum(getattr(s, k) for s in results) for k in ("bytes", "wire", "full", "ranges", "errors")}
    return {**total, "wall": wall, "mbps": total["bytes"] / wall / 1e6, "wire_mbps": total["wire"] / wall / 1e6,
            "req_s": (total["full"] + total["ranges"]) / wall,
            "p50": float(np.percentile(lat, 50)) * 1e3, "p99": float(np.percentile(lat, 99)) * 1e3,
            "api_p99": float(np.percentile(api, 99)) * 1e3, "api_n": len(api),
            "server_gb": server_s / max(total["bytes"], 1) * 1e9,
            "server_wire_gb": server_s / max(total["wire"], 1) * 1e9,
            "server_cores": server_s / wall, "client_cores": client_s / wall,
            "other_cores": (box_s - server_s - client_s) / wall,
            "why": [w for s in results for w in s.why][:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="load time per server (report: 60)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--client-procs", type=int, default=1, help="processes the client tasks run in")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run per server")
    parser.add_argument("--servers", nargs="+", default=sorted(ENGINES), choices=ENGINES,
                        help="cifar5m serve --server values to run")
    parser.add_argument("--loop", default="auto", help="event loop of our server (auto/asyncio/uvloop)")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard (~3.8 MB/1000)")
    parser.add_argument("--range-fraction", type=float, default=0.5, help="share of downloads that are ranges")
    parser.add_argument("--max-range", type=int, default=1024 * 1024, help="longest range in bytes")
    parser.add_argument("--max-requests", type=int, default=100_000, help="per client")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        root = Path(tmp)
        # Raw npy samples: fast to write, ~3.8 KB per sample in the tar.
        ds = write_dataset(root / REPO, n_train=args.shards * args.per_shard, n_test=0,
                           shard_size=args.per_shard, image_format="npy")
        files = {p.name: p.read_bytes() for p in ds.iterdir() if p.name.endswith(".tar")}
        size = sum(map(len, files.values())) / 1e6
        print(f"{len(files)} shards, {size:.1f} MB; {args.clients} clients in {args.client_procs} client process(es), "
              f"{args.seconds:.0f} s per server, {1 - args.range_fraction:.0%} whole shards / "
              f"{args.range_fraction:.0%} ranges of 1..{args.max_range} bytes, every 10th call an API call")
        runs = [("http.server", 1)] + [(f"cifar5m serve --server {e}", w) for e in args.servers
                                       for w in args.workers]
        rows = []
        for kind, workers in runs:
            proc, port, prefix = start_server(kind, root, workers, args.loop, kind.rsplit(" ", 1)[-1])
            try:
                rows.append((kind, workers, run_load(files, proc, port, prefix, kind != "http.server", args)))
            finally:
                proc.terminate()
                proc.wait(30)
    base = rows[0][2]["mbps"] or 1e-9
    print("\n| server | workers | MB/s (asked) | MB/s (wire) | req/s | whole | ranges | errors "
          "| p50 ms | p99 ms | API p99 ms (n) | server CPU-s/GB (wire) | cores: server/client/other "
          "| vs http.server |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, workers, r in rows:
        api = "HEAD only" if kind == "http.server" else "info/tree/paths-info/HEAD"
        print(f"| {kind} | {workers} | {r['mbps']:.0f} | {r['wire_mbps']:.0f} | {r['req_s']:.0f} | {r['full']} "
              f"| {r['ranges']} | {r['errors']} | {r['p50']:.1f} | {r['p99']:.1f} "
              f"| {r['api_p99']:.1f} ({r['api_n']}, {api}) | {r['server_gb']:.2f} ({r['server_wire_gb']:.2f}) "
              f"| {r['server_cores']:.2f}/{r['client_cores']:.2f}/{r['other_cores']:.2f} "
              f"| {r['mbps'] / base:.2f}x |")
    for kind, workers, r in rows:
        for why in r["why"]:
            print(f"error ({kind}, {workers} workers): {why}")


if __name__ == "__main__":
    main()
