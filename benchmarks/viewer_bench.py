"""How fast the dataset page loads: ``cifar5m serve ROOT`` (1 worker), then the page of
ORG/NAME and its 10 sample PNGs, three times, after ``--wait`` seconds (the worker's warm-up).

    cifar5m import cifar10-jpeg.tar.gz --out /tmp/c10/lab/cifar10 --image-format npy
    python benchmarks/viewer_bench.py /tmp/c10 lab/cifar10 --wait 3
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from cifar5m.dataset_server.launcher import free_port, wait_http  # noqa: E402


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return reply.status, reply.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("repo", help="org/name")
    parser.add_argument("--wait", type=float, default=3.0, help="seconds between start and the first request")
    args = parser.parse_args()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cifar5m", "serve", args.root, "--port", str(port),
                             "--workers", "1", "--no-access-log"], cwd=REPO_ROOT, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc)
        time.sleep(args.wait)
        for run in range(3):
            t0 = time.perf_counter()
            status, body = get(f"{url}/datasets/{args.repo}")
            page = time.perf_counter() - t0
            assert status == 200, status
            for k in range(body.decode().count("/samples/")):
                assert get(f"{url}/datasets/{args.repo}/samples/{k}.png")[0] == 200
            print(f"run {run}: page {page * 1e3:.1f} ms ({len(body):,} bytes), "
                  f"page + sample PNGs {(time.perf_counter() - t0) * 1e3:.1f} ms")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
