"""Load test of ``cifar5m serve`` against nginx and ``python -m http.server`` on the same files.

Loopback only, bounded by ``--seconds`` per server and mix and ``--max-requests`` per client.
``--clients`` concurrent clients (asyncio tasks on raw HTTP/1.1 keep-alive sockets in
``--client-procs`` processes, see ``serve_load.py``; the same client and the same seeded
request sequence for every server) download random whole shards and random byte ranges
of a dataset written with the real writer, and compare every byte asked for with the
file. Mixes (``--mixes``): ``mix`` (half whole shards, half ranges of up to 1 MiB),
``whole`` (whole shards only) and ``small`` (ranges of up to 4 KiB only).
http.server ignores Range, so a range costs it the whole shard; the client checks the
slice it asked for. "MB/s" counts the bytes the clients asked for. Our API endpoints
(info, tree, paths-info, HEAD) are sampled between downloads and their p99 latency
reported; http.server, nginx and the aiohttp floor only have HEAD. ``--servers "aiohttp
floor"`` adds the least an aiohttp server does to send a file (``serve_floor.py``), and
``"aiohttp floor, uvloop"`` the same on uvloop's event loop, ``"aiohttp FileResponse"`` the
same with aiohttp's own ``web.FileResponse`` as the body. ``"cifar5m serve + nginx"`` is the
deployment of docs/serving.md: nginx (the config of ``cifar5m.dataset_server.nginx``, with the
same send buffer) in front of ``cifar5m serve --accel-redirect``, which answers every request
and has nginx send the file bytes; its server CPU is that of both process trees.

nginx (the distribution's package; skipped with a note when not installed) is the
anchor: a config written here serves the same directory on 127.0.0.1 with ``sendfile``,
``--workers`` worker processes, no access log and the 4 MiB socket send buffer that
``cifar5m serve`` sets too, as ``user root`` (its workers must read the private temp dir
this benchmark writes to).

CPU: utime+stime of the server's process tree (all workers and threads) and of the
client processes over the load, and the whole machine's busy time from /proc/stat;
"server CPU-s/GB" (per GB asked for) does not depend on how the cores are shared. On
loopback the kernel charges TCP work (the receiving side's softirq, transmits started by an
ACK) to whichever process is running, so the split between server and client differs
between servers doing the same work: "server+client CPU/GB" (the same client for every
server) is reported next to it.

On a shared box one run's ratio to nginx moves with the other jobs' load (nginx's own
CPU-s/GB moved 0.13-0.19 between runs here): ``--repeat K`` runs every server K times,
interleaved (run 1 of each server, then run 2 of each, the order rotated per run), and
judges the goal on the median of the K per-run ratios, printed with their spread and
how many single runs met it.

    python benchmarks/serve_bench.py --seconds 15 --workers 2
    python benchmarks/serve_bench.py --seconds 8 --repeat 3 --servers nginx "aiohttp floor" "cifar5m serve"
    python benchmarks/serve_bench.py --seconds 5 --repeat 2 --servers nginx "cifar5m serve" "cifar5m serve + nginx"
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from serve_load import REPO, box_busy_s, children_cpu_s, client_proc, tree_cpu_s, wait_idle  # noqa: E402

from cifar5m.dataset_server import nginx  # noqa: E402
from cifar5m.dataset_server.launcher import free_port, wait_http  # noqa: E402
from cifar5m.shards.synthetic import write_synthetic_dataset  # noqa: E402

MIXES = {"mix": (0.5, 1024 * 1024), "whole": (0.0, 1024 * 1024), "small": (1.0, 4096)}
NGINX_CONF = """user root;
worker_processes {workers};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 30s;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} sndbuf=4m;
        root {root};
    }}
}}
"""


SERVER_CPUS, CLIENT_CPUS = {0}, {1}  # --pin


FRONTED = "cifar5m serve + nginx"  # nginx in front, sending the bytes (--accel-redirect)
OURS = ("cifar5m serve", FRONTED)  # the servers with the Hub API
# (MB/s at least, server CPU per GB at most) vs nginx alone, on the mix: the goal of nginx in
# front, and a guard against regressions of cifar5m serve alone (its CPU only)
GOALS = {"cifar5m serve": (0.0, 2.0), FRONTED: (0.95, 1.15)}


def start_server(kind: str, root: Path, workers: int, tmp: Path, *,
                 cpus: set[int] | None = None) -> tuple[list[subprocess.Popen], int, str]:
    """The processes of setup ``kind`` (each with its own tree), its port and its URL prefix."""
    port = free_port()
    prefix = f"/datasets/{REPO}/resolve/main" if kind in OURS else ""
    cmds = []
    if kind == "http.server":
        cmds.append([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                     "--directory", str(root / REPO)])
    elif kind == "nginx":
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(workers=workers, tmp=tmp, port=port, root=root / REPO))
        cmds.append([shutil.which("nginx") or "nginx", "-c", str(conf), "-e", str(tmp / "nginx-error.log")])
    elif kind.startswith("aiohttp"):
        cmds.append([sys.executable, str(REPO_ROOT / "benchmarks/serve_floor.py"), str(root / REPO), str(port),
                     str(workers)])
        cmds[-1] += {"aiohttp floor, uvloop": ["--uvloop"], "aiohttp FileResponse": ["--file-response"]}.get(kind, [])
    else:
        upstream = free_port() if kind == FRONTED else port
        cmds.append([sys.executable, "-m", "cifar5m", "serve", str(root), "--port", str(upstream),
                     "--workers", str(workers), "--no-access-log"])
        if kind == FRONTED:  # the config of docs/serving.md, with the send buffer nginx alone has
            cmds[-1] += ["--accel-redirect", nginx.PREFIX]
            (tmp / "front").mkdir(exist_ok=True)
            site = nginx.site_config(root=root, listen=f"127.0.0.1:{port} sndbuf=4m", upstream=f"127.0.0.1:{upstream}")
            conf = nginx.main_config(tmp / "front", site, workers=workers)
            cmds.append([shutil.which("nginx") or "nginx", "-c", str(conf), "-e", str(tmp / "front/nginx-error.log")])
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))  # workers inherit it
    procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=pin) for cmd in cmds]
    wait_http(f"http://127.0.0.1:{port}{prefix}/manifest.json", procs[-1], seconds=60)
    return procs, port, prefix


def pinned_client(pin: bool, *client_args) -> None:
    if pin:  # the clients on CPU 1, the server on CPU 0 (--pin)
        os.sched_setaffinity(0, CLIENT_CPUS)
    client_proc(*client_args)


def run_load(files: dict[str, bytes], servers: list[subprocess.Popen], port: int, prefix: str, ours: bool,
             args) -> dict:
    """Run the clients against one server; throughput, latency and where the CPU went."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    per = [args.clients // args.client_procs + (i < args.clients % args.client_procs)
           for i in range(args.client_procs)]
    procs = [ctx.Process(target=pinned_client, args=(args.pin, files, port, prefix, ours, args, n, i, queue))
             for i, n in enumerate(per)]
    for server in servers:
        wait_idle(server.pid)
    cpu0 = (sum(tree_cpu_s(s.pid) for s in servers), children_cpu_s(), box_busy_s())
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [s for _ in procs for s in queue.get()]
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    cpu1 = (sum(tree_cpu_s(s.pid) for s in servers), children_cpu_s(), box_busy_s())
    server_s, client_s, box_s = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    lat = np.array([x for s in results for x in s.lat] or [0.0])
    api = np.array([x for s in results for x in s.api] or [0.0])
    total = {k: sum(getattr(s, k) for s in results) for k in ("bytes", "wire", "full", "ranges", "errors")}
    return {**total, "wall": wall, "mbps": total["bytes"] / wall / 1e6, "wire_mbps": total["wire"] / wall / 1e6,
            "req_s": (total["full"] + total["ranges"]) / wall,
            "p50": float(np.percentile(lat, 50)) * 1e3, "p99": float(np.percentile(lat, 99)) * 1e3,
            "api_p99": float(np.percentile(api, 99)) * 1e3, "api_n": len(api),
            "server_gb": server_s / max(total["bytes"], 1) * 1e9,
            "pair_gb": (server_s + client_s) / max(total["bytes"], 1) * 1e9,
            "server_wire_gb": server_s / max(total["wire"], 1) * 1e9,
            "server_cores": server_s / wall, "client_cores": client_s / wall,
            "other_cores": (box_s - server_s - client_s) / wall,
            "why": [w for s in results for w in s.why][:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="load time per server and mix")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--client-procs", type=int, default=1, help="processes the client tasks run in")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of cifar5m serve and nginx")
    parser.add_argument("--servers", nargs="+", default=["http.server", "nginx", "cifar5m serve"],
                        choices=["http.server", "nginx", "aiohttp floor", "aiohttp floor, uvloop", "aiohttp FileResponse",
                                 "cifar5m serve", FRONTED])
    parser.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard (~3.8 MB/1000)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="per client")
    parser.add_argument("--pin", action="store_true",
                        help="server (all its workers) on CPU 0, clients on CPU 1: the loopback "
                             "TCP work of a reply is then charged on the server's CPU for every "
                             "server alike, not to whichever process happened to be running")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per server, interleaved; the goal is judged on the median per-run ratio")
    args = parser.parse_args()
    missing = {"nginx": shutil.which("nginx") is None, FRONTED: shutil.which("nginx") is None,
               "aiohttp floor, uvloop": importlib.util.find_spec("uvloop") is None}
    servers = [s for s in args.servers if not missing.get(s)]
    for kind in sorted(set(args.servers) - set(servers)):
        print(f"{kind}: not installed ({'pip install uvloop' if 'uvloop' in kind else 'apt-get install nginx'}): "
              "its rows are left out")

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        root = Path(tmp)
        # Raw npy samples: fast to write, ~3.8 KB per sample in the tar.
        ds = write_synthetic_dataset(root / REPO, n_train=args.shards * args.per_shard, n_test=0,
                           shard_size=args.per_shard, image_format="npy")
        files = {p.name: p.read_bytes() for p in ds.iterdir() if p.name.endswith(".tar")}
        size = sum(map(len, files.values())) / 1e6
        print(f"{len(files)} shards, {size:.1f} MB; {args.clients} clients in {args.client_procs} client process(es), "
              f"{args.seconds:.0f} s per server and mix; mixes: mix = 50 % whole shards / 50 % ranges of "
              "1..1048576 bytes, whole = whole shards, small = ranges of 1..4096 bytes; every 10th call an API call")
        print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        rows = []
        for run in range(args.repeat):
            shift = run % len(servers)  # rotated: no server always runs first or after nginx
            for kind in servers[shift:] + servers[:shift]:
                workers = 1 if kind == "http.server" else args.workers
                procs, port, prefix = start_server(kind, root, workers, root,
                                                   cpus=SERVER_CPUS if args.pin else None)
                try:
                    for mix in args.mixes:
                        args.range_fraction, args.max_range = MIXES[mix]
                        r = run_load(files, procs, port, prefix, kind in OURS, args)
                        rows.append((run, kind, workers, mix, r))
                finally:
                    for proc in procs:
                        proc.terminate()
                        proc.wait(30)
        print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    report(rows, servers, args)


def report(rows: list[tuple], servers: list[str], args) -> None:
    anchor = {(run, mix): r for run, kind, _, mix, r in rows if kind == "nginx"}
    ratio = {}  # (run, kind, mix) -> (MB/s vs nginx, CPU/GB vs nginx)
    print("\n| run | server | workers | mix | MB/s (asked) | req/s | whole | ranges | errors | p50 ms | p99 ms "
          "| API p99 ms (n) | server CPU-s/GB | cores: server/client/other | MB/s vs nginx | CPU/GB vs nginx |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run, kind, workers, mix, r in sorted(rows, key=lambda x: (x[0], servers.index(x[1]), x[3])):
        api = "HEAD only" if kind not in OURS else "info/tree/paths-info/HEAD"
        base = anchor.get((run, mix))
        vs = "- | -"
        if base:
            ratio[run, kind, mix] = (r["mbps"] / max(base["mbps"], 1e-9), r["server_gb"] / max(base["server_gb"], 1e-9),
                                     r["pair_gb"] / max(base["pair_gb"], 1e-9))
            vs = "{:.2f}x | {:.2f}x".format(*ratio[run, kind, mix])
        print(f"| {run + 1} | {kind} | {workers} | {mix} | {r['mbps']:.0f} | {r['req_s']:.0f} | {r['full']} "
              f"| {r['ranges']} | {r['errors']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['api_p99']:.1f} ({r['api_n']}, "
              f"{api}) | {r['server_gb']:.2f} | {r['server_cores']:.2f}/{r['client_cores']:.2f}/"
              f"{r['other_cores']:.2f} | {vs} |")
    if ratio and args.repeat > 1:
        print(f"\nmedian of {args.repeat} per-run ratios to nginx (min-max):\n")
        print("| server | mix | server CPU-s/GB (median, min-max) | MB/s vs nginx | CPU/GB vs nginx "
              "| server+client CPU/GB vs nginx |")
        print("|---|---|---|---|---|---|")
        for kind in servers:
            for mix in args.mixes:
                got = [ratio[run, kind, mix] for run in range(args.repeat) if (run, kind, mix) in ratio]
                gb = [r["server_gb"] for run, k, _, m, r in rows if (k, m) == (kind, mix)]
                if got:
                    mb, cpu, pair = ([x[i] for x in got] for i in range(3))
                    print(f"| {kind} | {mix} | {statistics.median(gb):.2f} ({min(gb):.2f}-{max(gb):.2f}) "
                          f"| {statistics.median(mb):.2f}x ({min(mb):.2f}-{max(mb):.2f}) "
                          f"| {statistics.median(cpu):.2f}x ({min(cpu):.2f}-{max(cpu):.2f}) "
                          f"| {statistics.median(pair):.2f}x ({min(pair):.2f}-{max(pair):.2f}) |")
    errors = sum(r["errors"] for *_, r in rows)
    for kind, (goal_mb, goal_cpu) in GOALS.items():
        ours = [ratio[run, kind, "mix"] for run in range(args.repeat) if (run, kind, "mix") in ratio]
        if not ours:
            continue
        mb, cpu = statistics.median(x[0] for x in ours), statistics.median(x[1] for x in ours)
        met = mb >= goal_mb and cpu <= goal_cpu and errors == 0
        single = sum(x[0] >= goal_mb and x[1] <= goal_cpu for x in ours)
        pair = statistics.median(x[2] for x in ours)
        print(f"\ngoal of {kind} (mix: >= {goal_mb}x nginx MB/s, <= {goal_cpu}x its server CPU-s/GB, zero errors), "
              f"on the median of {len(ours)} run(s): {mb:.2f}x MB/s, {cpu:.2f}x CPU/GB, {errors} errors: "
              f"{'met' if met else 'NOT met'} ({single} of {len(ours)} single runs met it); server+client CPU/GB "
              f"{pair:.2f}x nginx's")
    for _, kind, _, mix, r in rows:
        for why in r["why"]:
            print(f"error ({kind}, {mix}): {why}")


if __name__ == "__main__":
    main()
