"""``stream_bench.py --scale``: `cifar5m stream` on a dataset sized against RAM, cold.

    .venv/bin/python benchmarks/stream_bench.py --scale --gigabytes 30 --batches 2000

A first version (sketch): it builds (or reuses) an npy dataset of about --gigabytes from
synthetic npz parts through ``cifar5m import``, then for a local and an HTTP source
(``cifar5m serve`` in its own process), ideal and real world, runs ``cifar5m stream
--json`` in a child after evicting the page cache (``drop_caches`` where permitted, and
``posix_fadvise(DONTNEED)`` on every dataset file, which needs no privilege) and reports
img/s, bytes read from disk (``/proc/<pid>/io`` of the client, plus the server's and its
workers' for HTTP) per byte of split delivered (real world: per byte of its subset, read
once), the client's peak RSS (``wait4``) and the first batch timed from process start.
Only the dataset's files are evicted between runs, so the libraries stay cached and the
bytes counted are the dataset's. Not yet run at the 5M-sample scale.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PART_ROWS = 200_000  # one synthetic npz part: 614 MB of pixels
CLI = [sys.executable, "-m", "cifar5m"]


def build(work: Path, gigabytes: float) -> Path:
    """An npy dataset of about ``gigabytes`` on disk (5,120 bytes a sample), reused."""
    out = work / f"scale-{gigabytes:g}G"
    if (out / "manifest.json").exists():
        return out
    rows = int(gigabytes * 1e9 / 5120)
    parts, rng = [], np.random.default_rng(0)
    for p in range(-(-rows // PART_ROWS)):
        n = min(PART_ROWS, rows - p * PART_ROWS)
        path = work / f"cifar5m_part{p}.npz"
        np.savez(path, X=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 Y=rng.integers(0, 10, n, dtype=np.int64))
        parts.append(str(path))
    subprocess.run([*CLI, "import", *parts, "--out", str(out), "--image-format", "npy",
                    "--test-part", "-1", "--workers", "2"], check=True)
    for part in parts:
        os.unlink(part)
    return out


def evict(root: Path, *, everything: bool = False) -> str:
    """Drop this dataset's files from the page cache (and all of it, where permitted,
    with ``everything``)."""
    how = "posix_fadvise(DONTNEED) of the dataset's files"
    if everything:
        with contextlib.suppress(OSError):
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            how = "drop_caches"
    for path in root.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return how


def read_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes")).split()[1])


def tree_read_bytes(pid: int) -> int:
    """read_bytes of ``pid`` and its children (``cifar5m serve``'s worker processes)."""
    total = read_bytes(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                total += read_bytes(int(stat.parent.name))
    return total


def measure(cmd: list[str], *, server: int | None = None) -> dict:
    """Run ``cmd`` (stdout: JSON or nothing); its disk reads, the server's, peak RSS, wall."""
    before = tree_read_bytes(server) if server else 0
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    client = 0
    while True:
        with contextlib.suppress(OSError):  # gone between polls
            client = read_bytes(proc.pid)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.05)
    text = proc.stdout.read()
    result = json.loads(text[text.index("{"):]) if "{" in text else {}
    return {**result, "client_read": client, "server_read": tree_read_bytes(server) - before if server else 0,
            "peak_rss": usage.ru_maxrss * 1024, "wall": time.monotonic() - t0, "status": status}


def run(args) -> None:
    root = build(args.work, args.gigabytes)
    train = json.loads((root / "manifest.json").read_text())["totals"]["train"]
    per_sample = train["bytes"] / train["samples"]
    how = evict(root, everything=True)  # everything once (where permitted); then only the dataset's files,
    # so the libraries stay cached and the client's read_bytes are dataset bytes
    measure([*CLI, "stream", str(root), "--limit", "1", "--json"])  # warms the libraries
    port = 8000 + os.getpid() % 1000
    server = subprocess.Popen([*CLI, "serve", str(root), "--port", str(port)], stderr=subprocess.DEVNULL)
    time.sleep(3)  # sketch: wait_http from tests.test_server_support would be better
    url = f"http://127.0.0.1:{port}/datasets/local/{root.name}/resolve/main"
    worlds = {"ideal": ["--world", "ideal"], "real": ["--world", "real", "--n", str(args.n)]}
    print(f"{root} ({train['bytes'] / 1e9:.1f} GB train split, {train['samples']:,} samples), "
          f"cache evicted by {how} first, then the dataset's files before each run by posix_fadvise")
    print("| source | world | img/s | disk read / split bytes delivered (real: of the subset) "
          "| client peak RSS | first batch from start |")
    print("|---|---|---|---|---|---|")
    try:
        for name, source in (("local", str(root)), ("HTTP", url)):
            for world, flags in worlds.items():
                evict(root)
                r = measure([*CLI, "stream", source, *flags, "--batch-size", str(args.batch),
                             "--steps", str(args.batches), "--json"],
                            server=server.pid if name == "HTTP" else None)
                # The real world reads its --n samples once (then epochs over them in memory).
                samples = r.get("rank_samples", 0) if world == "ideal" else min(args.n, r.get("rank_samples", 0))
                delivered = samples * per_sample
                disk = r["client_read"] + r["server_read"]
                print(f"| {name} | {world} | {r.get('images_per_s', 0):,.0f} | "
                      f"{disk / max(delivered, 1):.2f}x ({disk / 1e9:.2f} of {delivered / 1e9:.2f} GB) | "
                      f"{r['peak_rss'] / 1e6:,.0f} MB | {r.get('first_batch_from_start_s')} s |")
    finally:
        server.terminate()
        server.wait(10)
