"""``stream_bench.py --scale``: `cifar5m stream` on a dataset larger than RAM, cold.

    # CIFAR-5m's size and layout (six 1,000,448-row parts, 5,012,240 images, ~25.7 GB):
    .venv/bin/python benchmarks/stream_bench.py --scale --work /work/scale --batches 0
    # the code at another commit ("before"), from a worktree of it, a few hundred batches:
    .venv/bin/python benchmarks/stream_bench.py --scale --work /work/scale \
        --code /work/scale/before --label before --batches 300
    # a smaller all-train dataset of about --gigabytes:
    .venv/bin/python benchmarks/stream_bench.py --scale --gigabytes 2 --batches 100

It builds (or reuses) an npy dataset from synthetic npz parts through ``cifar5m import``,
measures the disk's sequential read rate (``dd`` of 2 GB of shards, cold: the limit of a
cold epoch), then for a local and an HTTP source (``cifar5m serve`` on 127.0.0.1 in its
own process, waited for until it answers), ideal and real world, runs ``cifar5m stream
--json`` in a child after evicting the page cache (``drop_caches`` where permitted, and
``posix_fadvise(DONTNEED)`` on every dataset file, which needs no privilege) and reports
img/s, bytes read from disk (``/proc/<pid>/io`` of the client, plus the server's and its
workers' for HTTP) per byte of split delivered (real world: per byte of its subset, read
once), the client's peak RSS (``wait4``) and the first batch timed from process start
(the command's own figure where it has one, and in every case the moment its progress bar
first counts images, seen from outside). Only the dataset's files are evicted between
runs, so the libraries stay cached and the bytes counted are the dataset's. --batches 0
runs the whole split (one full epoch). It also times ``cifar5m.shards.reader.Dataset(DIR)
.split("train")`` and the first ``get(key)`` in a child (peak RSS from wait4). --code runs
another checkout of the project (its tree first on PYTHONPATH and as the working
directory, this venv's packages) for a before/after table on the same dataset. Each row
is also appended as JSON to --results. ``posix_fadvise(DONTNEED)`` cannot evict pages that
another process has mapped, and another reader shares the disk and the cores, so a row
during which any other process held a dataset file open or mapped is flagged ("suspect").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

PART_ROWS = 1_000_448  # rows of one CIFAR-5m npz part (3.07 GB of pixels)
CLI = [sys.executable, "-m", "cifar5m"]
CHUNK = 16_384  # rows generated and written at a time, so building needs ~50 MB


def write_part(path: Path, rows: int, seed: int) -> None:
    """One synthetic CIFAR-5m part (``X`` uint8 (rows, 32, 32, 3), ``Y`` int64 labels),
    deterministic from ``seed``, written in chunks into an uncompressed npz (as
    ``np.savez`` writes), so a 1M-row part never sits in memory."""
    import zipfile

    from numpy.lib import format as npformat

    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("X.npy", "w", force_zip64=True) as f:
            npformat.write_array_header_2_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (rows, 32, 32, 3)})
            for start in range(0, rows, CHUNK):
                f.write(rng.integers(0, 256, (min(CHUNK, rows - start), 32, 32, 3), dtype=np.uint8).data)
        with zf.open("Y.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, rng.integers(0, 10, rows, dtype=np.int64))
    os.replace(tmp, path)


def build(work: Path, gigabytes: float | None = None, *, parts: int = 6) -> Path:
    """An npy dataset, reused when built. ``gigabytes``: about that much train split (5,120
    bytes a sample) from parts of PART_ROWS or fewer rows, all train. None: CIFAR-5m's real
    layout, ``parts`` parts of 1,000,448 rows imported the paper's way (parts 0..parts-2
    train, the first 10,000 rows of the last part test; 5,012,240 images for six parts).
    The npz parts are deleted after a successful import."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / (f"scale-{gigabytes:g}G" if gigabytes else f"cifar5m-{parts}parts-npy")
    if (out / "manifest.json").exists():
        return served(out)
    if gigabytes:
        rows = int(gigabytes * 1e9 / 5120)
        sizes = [min(PART_ROWS, rows - start) for start in range(0, rows, PART_ROWS)]
        flags = ["--test-part", "-1"]
    else:
        sizes, flags = [PART_ROWS] * parts, ["--test-part", str(parts - 1)]
    paths = []
    for p, n in enumerate(sizes):
        path = work / f"cifar5m_part{p}.npz"
        if not path.exists():
            print(f"writing {path} ({n:,} rows)", flush=True)
            write_part(path, n, seed=p)
        paths.append(str(path))
    subprocess.run([*CLI, "import", *paths, "--out", str(out), "--image-format", "npy", *flags,
                    "--workers", "2"], check=True)
    for path in paths:
        os.unlink(path)
    return served(out)


def served(out: Path) -> Path:
    """Move a dataset to ``DIR/data/local/NAME`` (the ``<root>/<org>/<name>`` layout every
    version of ``cifar5m serve`` reads; older ones skip a symlinked dataset) and leave a
    symlink at ``out``."""
    if out.is_symlink():
        return out
    home = out.parent / "data" / "local" / out.name
    home.parent.mkdir(parents=True, exist_ok=True)
    os.replace(out, home)
    out.symlink_to(home)
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
    for path in root.resolve().iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return how


def disk_rate(root: Path, gigabytes: float = 2.0) -> float:
    """Sequential read rate of the dataset's disk in bytes/s: ``dd bs=8M`` of whole shards
    (about ``gigabytes``), evicted first, one after another (what a cold epoch reads at best)."""
    shards = sorted(root.resolve().glob("*.tar"))
    files, total = [], 0
    for path in shards:
        if total >= gigabytes * 1e9:
            break
        files.append(path)
        total += path.stat().st_size
    evict(root)
    t0 = time.monotonic()
    for path in files:
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=8M"], check=True, stderr=subprocess.DEVNULL)
    return total / (time.monotonic() - t0)


def read_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes")).split()[1])


def tree_read_bytes(pid: int) -> int:
    """read_bytes of ``pid`` and its children (``cifar5m serve``'s worker processes)."""
    total = read_bytes(pid)
    for child in _children(pid):
        with contextlib.suppress(OSError):  # exited since it was listed
            total += read_bytes(child)
    return total


def other_readers(home: Path, mine: set[int]) -> list[str]:
    """Processes outside ``mine`` holding a file of the dataset open or mapped (another
    job reading it warms the page cache and shares the disk: the row is then suspect)."""
    needle, found = str(home), []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) in mine or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (proc / "maps").read_text() or any(
                    needle in os.readlink(fd) for fd in (proc / "fd").iterdir()):
                found.append(f"{proc.name}: {(proc / 'cmdline').read_text().replace(chr(0), ' ')[:120]}")
    return found


def _watch_readers(home: Path, mine: set[int], found: dict, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        for line in other_readers(home, mine):
            found.setdefault(line, True)


BAR_COUNT = re.compile(r"\|\s*([0-9.]+)([kMG]?)/")


def _first_count(stream, t0: float, seen: list[float]) -> None:
    """The time after ``t0`` at which a tqdm bar on ``stream`` first counts images."""
    buf = ""
    for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
        if seen:
            continue  # drain
        buf = (buf + chunk.decode(errors="replace"))[-512:]
        for match in BAR_COUNT.finditer(buf):
            if float(match.group(1)) > 0:
                seen.append(time.monotonic() - t0)
                break


def measure(cmd: list[str], *, server: int | None = None, cwd: Path | None = None,
            env: dict | None = None, home: Path | None = None, ours: int | None = None) -> dict:
    """Run ``cmd`` (stdout: JSON or nothing); its disk reads, the server's, peak RSS, wall,
    when its progress bar (stderr) first counted images, and (with ``home``, the dataset)
    which other processes read the dataset meanwhile (``ours``: our server, not counted)."""
    before = tree_read_bytes(server) if server else 0
    t0 = time.monotonic()
    # every bar update printed (tqdm reads TQDM_* variables as its defaults)
    bar = {"TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env={**os.environ, **bar, **(env or {})})
    first: list[float] = []
    watcher = threading.Thread(target=_first_count, args=(proc.stderr, t0, first), daemon=True)
    watcher.start()
    readers: dict = {}
    stop = threading.Event()
    if home is not None:
        mine = {proc.pid, *([ours] if ours else []), *_children(ours)}
        threading.Thread(target=_watch_readers, args=(home, mine, readers, stop), daemon=True).start()
    client = 0
    while True:
        with contextlib.suppress(OSError):  # gone between polls
            client = read_bytes(proc.pid)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.05)
    wall = time.monotonic() - t0
    stop.set()
    text = proc.stdout.read()
    watcher.join(5)
    result = json.loads(text[text.index("{"):]) if "{" in text else {}
    return {**result, "client_read": client, "server_read": tree_read_bytes(server) - before if server else 0,
            "peak_rss": usage.ru_maxrss * 1024, "wall": wall, "status": status,
            "first_counted_s": first[0] if first else None, "other_readers": sorted(readers)}


def _children(pid: int | None) -> list[int]:
    if not pid:
        return []
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


SPLIT_PROBE = """
import json, resource, sys, time
t0 = time.perf_counter()
from cifar5m.shards.reader import Dataset
t1 = time.perf_counter()
rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
split = Dataset(sys.argv[1]).split("train")
t2 = time.perf_counter()
rss_split = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
key = split.keys[len(split) // 2] if isinstance(split.keys, list) else None
t3 = time.perf_counter()
sample = split.get(key) if key is not None else split[len(split) // 2]
t4 = time.perf_counter()
rss_get = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"import_s": t1 - t0, "split_s": t2 - t1, "import_peak_rss": rss_import,
                  "split_peak_rss": rss_split, "get_peak_rss": rss_get,
                  "first_get_s": t4 - t3, "samples": len(split), "key": sample.key}))
"""


def split_probe(root: Path, cwd: Path | None, env: dict) -> dict:
    """``Dataset(root).split("train")``: time and peak RSS; then the first ``get(key)``."""
    return measure([sys.executable, "-c", SPLIT_PROBE, str(root)], cwd=cwd, env=env)


def run(args) -> None:
    root = build(args.work, args.gigabytes or None)
    train = json.loads((root / "manifest.json").read_text())["totals"]["train"]
    per_sample = train["bytes"] / train["samples"]
    code = Path(args.code).resolve() if args.code else None
    # An old checkout's server may need packages this venv no longer has (--code-deps).
    env = {"PYTHONPATH": os.pathsep.join([str(code), *([args.code_deps] if args.code_deps else [])])} if code else {}
    label = args.label or ("after" if code is None else code.name)
    results = Path(args.results) if args.results else None
    how = evict(root, everything=True)  # everything once (where permitted); then only the dataset's
    # files, so the libraries stay cached and the client's read_bytes are dataset bytes

    def record(row: dict) -> None:
        row = {"label": label, "dataset": str(root), **row}
        if results is not None:
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")

    if "disk" in args.rows:
        rate = disk_rate(root)
        record({"row": "disk", "sequential_bytes_per_s": rate})
        print(f"disk sequential read (dd bs=8M of 2 GB of shards, cold): {rate / 1e6:,.0f} MB/s "
              f"= {rate / per_sample:,.0f} img/s of split bytes")
    measure([*CLI, "stream", str(root), "--limit", "1", "--json"], cwd=code, env=env)  # warms the libraries
    if "split" in args.rows:
        evict(root)
        r = split_probe(root, code, env)
        record({"row": "split", **r})
        print(f"Dataset(DIR).split('train') ({r.get('samples', 0):,} samples, cold): "
              f"{r.get('split_s', 0):.2f} s, peak RSS {r.get('split_peak_rss', 0) / 1e6:,.0f} MB "
              f"({r.get('import_peak_rss', 0) / 1e6:,.0f} MB after the import of cifar5m.shards.reader); "
              f"first get(key) {r.get('first_get_s', 0):.2f} s, peak RSS then "
              f"{r.get('get_peak_rss', 0) / 1e6:,.0f} MB")
    from cifar5m.dataset_server.launcher import free_port

    port = free_port()
    home = root.resolve()  # served from <root>/local/<name> (see served)
    url = f"http://127.0.0.1:{port}/datasets/local/{home.name}/resolve/main"
    server = None
    if any(row.startswith("http") for row in args.rows):
        from cifar5m.dataset_server.launcher import wait_http

        server = subprocess.Popen([*CLI, "serve", str(home.parent.parent), "--port", str(port)],
                                  stderr=subprocess.DEVNULL,
                                  cwd=code, env={**os.environ, **env})
        wait_http(f"{url}/manifest.json", server)
        # and until its start-up work is over: the viewer's warm-up (class counts, sample
        # strips) read and decoded while the first HTTP row ran and cost it ~7 s of its
        # first batch (12.3 s measured, 5.0 s against a settled server)
        from serve_load import wait_idle

        wait_idle(server.pid, max_s=120)
    # "first": one ideal batch (--limit 1), the time to first batch with nothing after it
    worlds = {"ideal": ["--world", "ideal"], "real": ["--world", "real", "--n", str(args.n)],
              "first": ["--world", "ideal", "--limit", "1"]}
    steps = ["--limit", str(args.batches)] if args.batches else []
    print(f"{label}: {root} ({train['bytes'] / 1e9:.1f} GB train split, {train['samples']:,} samples), "
          f"cache evicted by {how} first, then the dataset's files before each run by posix_fadvise")
    print("| code | source | world | batches | img/s | disk read / split bytes delivered (real: of the subset) "
          "| client peak RSS | first batch from start (own / seen) |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for name, source in (("local", str(root)), ("http", url)):
            for world, flags in worlds.items():
                if f"{name}-{world}" not in args.rows:
                    continue
                evict(root)
                r = measure([*CLI, "stream", source, *flags, "--batch-size", str(args.batch),
                             *(steps if world == "ideal" else []), "--json"],
                            server=server.pid if name == "http" else None, cwd=code, env=env, home=home,
                            ours=server.pid if server is not None else None)
                # The real world reads its --n samples once (then epochs over them in memory).
                samples = r.get("rank_samples", 0) if world != "real" else min(args.n, r.get("rank_samples", 0))
                delivered = samples * per_sample
                disk = r["client_read"] + r["server_read"]
                record({"row": f"{name}-{world}", "delivered_bytes": delivered, "disk_read": disk, **r})
                own = r.get("first_batch_from_start_s")
                seen = r.get("first_counted_s")
                print(f"| {label} | {name} | {world} | {r.get('delivered_batches', 0):,} | "
                      f"{r.get('images_per_s', 0):,.0f} | "
                      f"{disk / max(delivered, 1):.2f}x ({disk / 1e9:.2f} of {delivered / 1e9:.2f} GB) | "
                      f"{r['peak_rss'] / 1e6:,.0f} MB | {own if own is not None else '-'} / "
                      f"{f'{seen:.2f}' if seen is not None else '-'} s |", flush=True)
                for line in r["other_readers"]:
                    print(f"  (suspect: another process read the dataset meanwhile: {line})", flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
