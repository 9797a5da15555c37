"""Server CPU per request, by kind, for ``cifar5m serve`` (and the aiohttp floor).

One client connection (``http.client``, keep-alive) sends ``--n`` requests of one kind after
another to a server with one worker; the server's process-tree CPU (utime+stime from
/proc) over those requests, divided by their number, is the cost of one request of that
kind. Kinds: the Hub API calls (info, tree, paths-info), a HEAD and a 1..4096-byte range
of a shard. Rounds (``--rounds``) alternate the kinds so load on a shared box spreads
over all of them; the median per kind is printed. Tick accounting (CLK_TCK 100): keep
``--n`` at 1000 or more.

    python benchmarks/serve_percall.py --n 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import http.client
import random
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from serve_bench import start_server  # noqa: E402
from serve_load import REPO, tree_cpu_s, wait_idle  # noqa: E402

from cifar5m.shards.synthetic import write_synthetic_dataset  # noqa: E402

KINDS = ("info", "tree", "paths-info", "HEAD", "range")


def one(conn: http.client.HTTPConnection, kind: str, prefix: str, name: str, rnd: random.Random) -> int:
    body, headers = None, {}
    if kind == "info":
        method, path = "GET", f"/api/datasets/{REPO}"
    elif kind == "tree":
        method, path = "GET", f"/api/datasets/{REPO}/tree/main?recursive=true&expand=false"
    elif kind == "paths-info":
        method, path = "POST", f"/api/datasets/{REPO}/paths-info/main"
        body, headers = f"paths={name}&expand=false".encode(), {"Content-Type": "application/x-www-form-urlencoded"}
    elif kind == "HEAD":
        method, path = "HEAD", f"{prefix}/{name}"
    else:
        start = rnd.randrange(100_000)
        method, path = "GET", f"{prefix}/{name}"
        headers = {"Range": f"bytes={start}-{start + rnd.randrange(4096)}"}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    resp.read()
    return resp.status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="requests per kind and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--floor", action="store_true", help="the aiohttp floor (HEAD and range only)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-percall-") as tmp:
        root = Path(tmp)
        ds = write_synthetic_dataset(root / REPO, n_train=args.shards * 100, n_test=0, shard_size=100, image_format="npy")
        names = sorted(p.name for p in ds.iterdir() if p.name.endswith(".tar"))
        kind = "aiohttp floor" if args.floor else "cifar5m serve"
        (proc,), port, prefix = start_server(kind, root, 1, root)  # waits until it answers
        kinds = ("HEAD", "range") if args.floor else KINDS
        try:
            wait_idle(proc.pid)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            rnd = random.Random(0)
            for kind in kinds:  # warm-up
                for _ in range(50):
                    assert one(conn, kind, prefix, rnd.choice(names), rnd) in (200, 206)
            us: dict[str, list[float]] = {k: [] for k in kinds}
            for _ in range(args.rounds):
                for kind in kinds:
                    cpu0 = tree_cpu_s(proc.pid)
                    for _ in range(args.n):
                        status = one(conn, kind, prefix, rnd.choice(names), rnd)
                        if status not in (200, 206):
                            raise SystemExit(f"{kind}: HTTP {status}")
                    us[kind].append((tree_cpu_s(proc.pid) - cpu0) / args.n * 1e6)
            conn.close()
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"server CPU per request (us; median of {args.rounds} rounds of {args.n}; all rounds):")
    for kind in kinds:
        print(f"  {kind:10s} {statistics.median(us[kind]):6.0f}   {' '.join(f'{x:.0f}' for x in us[kind])}")


if __name__ == "__main__":
    main()
