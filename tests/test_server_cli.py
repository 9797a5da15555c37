"""``cifar5m serve`` as a process: no torch, access log, clean shutdown, workers, bad config."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_server_support import REPO_ROOT, build_root, free_port, request


def start(root: Path | str, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cifar5m", "serve", str(root), "--port", str(port), *args],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if request(url, "GET", "/healthz")[0] == 200:
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server did not start: {proc.communicate()[0]}")


def stop(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


def test_serve_never_imports_torch():
    code = ("import sys\n"
            "from cifar5m.cli.main import cli\n"
            "import cifar5m.cli.serve, cifar5m.dataset_server.server, cifar5m.dataset_server.app, cifar5m.dataset_server.download\n"
            "from click.testing import CliRunner\n"
            "assert CliRunner().invoke(cli, ['serve', '--help']).exit_code == 0\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_logs_requests_and_stops_cleanly(make_dataset, tmp_path, sig):
    root = build_root(make_dataset, tmp_path / "root", n_train=20, n_test=10, shard_size=10)
    proc, url = start(root)
    status, headers, body = request(url, "GET", "/datasets/lab/ds/resolve/main/train-000001.tar",
                                    headers={"Range": "bytes=0-99"})
    assert headers["content-range"].startswith("bytes 0-99/")
    assert status == 206 and body == (root / "lab/ds/train-000001.tar").read_bytes()[:100]
    whole = (root / "lab/ds/train-000000.tar").read_bytes()
    status, headers, body = request(url, "GET", "/datasets/lab/ds/resolve/main/train-000000.tar")
    assert (status, body, headers["content-length"]) == (200, whole, str(len(whole)))
    code, log = stop(proc, sig)
    assert code == 0, log
    assert "serving lab/ds: 6 files" in log
    assert '"GET /datasets/lab/ds/resolve/main/train-000001.tar" 206 100 range=bytes=0-99' in log
    # Files sent by sendfile are logged with their size too.
    assert f'"GET /datasets/lab/ds/resolve/main/train-000000.tar" 200 {len(whole)} ' in log
    assert log.count("server stopped") == 1, log  # by the main process only, not by each worker


@pytest.mark.parametrize("entry", ["{tokens: []}", "''", "'  '", "[' t0k ']"])  # none could ever match
def test_serve_refuses_a_bad_token_file(make_dataset, tmp_path, entry):
    root = build_root(make_dataset, tmp_path / "root", n_train=20, n_test=10, shard_size=10)
    bad = tmp_path / "tokens.yaml"
    bad.write_text(f"datasets:\n  lab/ds: {entry}\n")
    out = subprocess.run([sys.executable, "-m", "cifar5m", "serve", str(root), "--tokens", str(bad)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"Error: {bad}: entry 'lab/ds' needs at least one non-empty token string (no spaces around it)")


def test_serve_refuses_a_port_in_use(make_dataset, tmp_path):
    root = build_root(make_dataset, tmp_path / "root", n_train=20, n_test=10, shard_size=10)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "cifar5m", "serve", str(root), "--port", str(port)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"Error: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "is another server running there? pass another --port")


def test_serve_one_dataset_folder_as_local_name(make_dataset, tmp_path):
    ds = build_root(make_dataset, tmp_path / "root", n_train=20, n_test=10, shard_size=10) / "lab" / "ds"
    proc, url = start(ds, "--workers", "1")
    try:
        listed = [d["id"] for d in json.loads(request(url, "GET", "/api/datasets")[2])]
        status, _, body = request(url, "GET", "/datasets/local/ds/resolve/main/README.md")
        assert listed == ["local/ds"] and (status, body) == (200, (ds / "README.md").read_bytes())
        assert request(url, "GET", "/datasets/lab/ds/resolve/main/README.md")[0] == 401
    finally:
        code, log = stop(proc, signal.SIGTERM)
    assert code == 0 and "serving local/ds: 6 files" in log, log


def test_dataset_folders_right_under_the_root_are_local_names(make_dataset, tmp_path):
    """``make demo`` leaves demo-output/cifar10 and demo-output/generated: ``cifar5m serve
    demo-output`` serves them as local/<name>, beside <org>/<name> folders; a symlinked one is not,
    and a root/local/<name> dataset of the same name is hidden, listed once and named at start."""
    root = build_root(make_dataset, tmp_path / "root", ("lab/ds",), n_train=20, n_test=10, shard_size=10)
    shutil.copytree(root / "lab" / "ds", root / "flat")
    shutil.copytree(root / "lab" / "ds", root / "local" / "flat")
    with open(root / "local/flat/README.md", "a") as card:  # its bytes differ from root/flat's
        card.write("\nthe hidden one\n")
    (root / "linked").symlink_to(root / "lab" / "ds")
    proc, url = start(root, "--workers", "1")
    try:
        listed = [d["id"] for d in json.loads(request(url, "GET", "/api/datasets")[2])]
        status, _, body = request(url, "GET", "/datasets/local/flat/resolve/main/README.md")
        assert listed == ["local/flat", "lab/ds"] and (status, body) == (200, (root / "flat/README.md").read_bytes())
        assert request(url, "GET", "/datasets/local/linked/resolve/main/README.md")[0] == 401
    finally:
        code, log = stop(proc, signal.SIGTERM)
    assert code == 0 and "serving local/flat" in log, log
    assert f"not serving local/flat: {root / 'local/flat'} has the name of {root / 'flat'}" in log, log


def test_a_root_without_datasets_is_refused_at_start(make_dataset, tmp_path):
    root = tmp_path / "root"
    (root / "lab").mkdir(parents=True)
    outside = make_dataset("outside", n_train=10, n_test=0)
    (root / "lab" / "linked").symlink_to(outside)  # a dataset folder symlinked from elsewhere
    out = subprocess.run([sys.executable, "-m", "cifar5m", "serve", str(root), "--port", "0"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"Error: no dataset to serve in {root}: expected {root}/manifest.json (one dataset), "
        f"{root}/<name>/manifest.json or {root}/<org>/<name>/manifest.json; symlinked dataset or org folders are not served")


def worker_pids(parent: int) -> set[int]:
    """The aiohttp worker processes of a ``cifar5m serve`` (not multiprocessing's helpers)."""
    pids = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            pids.add(int(entry))
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers in /proc")
def test_two_workers_serve_the_same_commit_and_a_killed_one_is_replaced(make_dataset, tmp_path):
    root = build_root(make_dataset, tmp_path / "root", n_train=20, n_test=10, shard_size=10)
    proc, url = start(root, "--workers", "2", "--no-access-log")

    def same_answers() -> None:  # whichever worker answers, the same commit and bytes
        for _ in range(4):
            status, headers, body = request(url, "GET", "/datasets/lab/ds/resolve/main/README.md")
            assert (status, headers["x-repo-commit"], body) == (200, sha, (root / "lab/ds/README.md").read_bytes())

    try:
        sha = json.loads(request(url, "GET", "/api/datasets/lab/ds")[2])["sha"]
        same_answers()
        before = worker_pids(proc.pid)
        assert len(before) == 2
        os.kill(min(before), signal.SIGKILL)
        deadline = time.monotonic() + 60
        after = worker_pids(proc.pid)
        while time.monotonic() < deadline and (len(after) < 2 or min(before) in after):
            time.sleep(0.1)
            after = worker_pids(proc.pid)
        assert len(after) == 2 and min(before) not in after
        same_answers()
    finally:
        code, log = stop(proc, signal.SIGTERM)
    assert code == 0, log
    assert f"(pid {min(before)}) ended with status -9; starting another" in log
    assert "resolve/main/README.md" not in log  # --no-access-log
    assert not worker_pids(proc.pid)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped
    except OSError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers in /proc")
def test_port_0_gives_every_worker_one_port_and_workers_end_with_the_supervisor(make_dataset, tmp_path):
    root = build_root(make_dataset, tmp_path / "root", n_train=20, n_test=10, shard_size=10)
    proc = subprocess.Popen([sys.executable, "-m", "cifar5m", "serve", str(root), "--port", "0", "--workers", "2",
                             "--no-access-log"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        lines = []
        while not lines or "listening on" not in lines[-1]:
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)
        port = int(lines[-1].split("http://127.0.0.1:")[1].split()[0])
        assert port != 0
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        for _ in range(6):  # new connections, whichever worker takes them
            assert request(f"http://127.0.0.1:{port}", "GET", "/healthz")[0] == 200
        # The supervisor killed outright: its workers notice and stop instead of serving on.
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(map(gone, workers)):
            time.sleep(0.1)
        assert all(map(gone, workers))
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_a_second_server_cannot_share_the_port_of_a_running_one(make_dataset, tmp_path):
    """The workers' SO_REUSEPORT sockets would let another server join the port and take
    half of the connections (its own root and tokens); the supervisor's plain bind refuses."""
    root = build_root(make_dataset, tmp_path / "root", n_train=20, n_test=10, shard_size=10)
    proc, url = start(root, "--workers", "2", "--no-access-log")
    try:
        port = url.rsplit(":", 1)[1]
        out = subprocess.run([sys.executable, "-m", "cifar5m", "serve", str(root), "--port", port, "--workers", "2"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "cannot listen on 127.0.0.1:" in out.stderr
    finally:
        code, log = stop(proc, signal.SIGTERM)
    assert code == 0, log
