"""Files sent by the server itself: ASGI pathsend (granian, whole files) and zerocopysend
(aiohttp bridge, sendfile): right bytes under concurrency, fds kept safely."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dataset_server.handles import FD_DIR, OpenFiles, pathsend_supported
from tests.test_server_support import ENGINES, build_root, request

pytestmark = pytest.mark.skipif(not pathsend_supported(), reason="needs /proc/self/fd (Linux)")

DS = "/datasets/lab/ds/resolve/main"


def spied(app, seen: list):
    """``app``, recording the type of every message it sends."""
    async def wrapper(scope, receive, send):
        async def spy(message):
            seen.append((scope.get("path"), message["type"]))
            await send(message)
        await app(scope, receive, spy)
    return wrapper


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_concurrent_whole_files_and_ranges_are_exact(make_dataset, tmp_path, engine):
    from dataset_server.app import create_app

    root = build_root(make_dataset, tmp_path / "root", n_train=200, n_test=50, shard_size=20)
    app = create_app(root=root)
    seen: list = []
    files = {p.name: p.read_bytes() for p in (root / "lab/ds").glob("*.tar")}
    names = sorted(files) * 4
    with ENGINES[engine](spied(app, seen)) as url:
        def whole(name):
            status, headers, body = request(url, "GET", f"{DS}/{name}")
            return status == 200 and body == files[name] and headers["content-length"] == str(len(body))

        def part(name):
            status, _, body = request(url, "GET", f"{DS}/{name}", headers={"Range": "bytes=100-5099"})
            return status == 206 and body == files[name][100:5100]

        with ThreadPoolExecutor(32) as pool:
            assert all(pool.map(whole, names)) and all(pool.map(part, names))
        status, headers, body = request(url, "HEAD", f"{DS}/{names[0]}")
        assert status == 200 and body == b"" and headers["content-length"] == str(len(files[names[0]]))
    kinds = {kind for _, kind in seen}
    assert ("http.response.pathsend" in kinds) == (engine == "granian")
    assert ("http.response.zerocopysend" in kinds) == (engine == "aiohttp")
    # One kept fd per file sent whole, however many requests and threads.
    assert len(app.state.ctx.open_files) == (len(files) if engine == "granian" else 0)
    app.state.ctx.open_files.close()


def test_a_replaced_file_keeps_its_old_fd_until_retired(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"first")
    files = OpenFiles(limit=3, retire_s=3600)
    fd1 = os.open(a, os.O_RDONLY)
    path1 = files.path_for(str(a), fd1)
    assert path1 == f"{FD_DIR}/{fd1}"  # kept: the caller must not close it
    fd2 = os.open(a, os.O_RDONLY)  # same inode: the kept fd is named, the caller closes its own
    assert files.path_for(str(a), fd2) == path1
    os.close(fd2)
    assert Path(path1).read_bytes() == b"first"
    # Replaced by a new file (new inode): the old fd stays open (a pathsend may not have
    # opened it yet), the new one is kept.
    a.rename(tmp_path / "old.bin")
    a.write_bytes(b"second")
    fd3 = os.open(a, os.O_RDONLY)
    assert files.path_for(str(a), fd3) == f"{FD_DIR}/{fd3}"
    assert len(files) == 2 and os.fstat(fd1).st_size == 5
    # The limit counts kept and retired fds: past it, the caller sends the file itself.
    b.write_bytes(b"b")
    fd4 = os.open(b, os.O_RDONLY)
    assert files.path_for(str(b), fd4) == f"{FD_DIR}/{fd4}"
    fd5 = os.open(tmp_path / "old.bin", os.O_RDONLY)
    assert files.path_for(str(tmp_path / "old.bin"), fd5) is None
    os.close(fd5)
    # Once retired for retire_s, the old fd is closed.
    files.retire_s = 0
    files._retired = [(0.0, fd) for _, fd in files._retired]
    fd6 = os.open(b, os.O_RDONLY)
    files.path_for(str(b), fd6)
    os.close(fd6)
    with pytest.raises(OSError):
        os.fstat(fd1)
    files.close()
    for fd in (fd3, fd4):
        with pytest.raises(OSError):
            os.fstat(fd)


def test_granian_runs_with_the_bounds_of_the_config(monkeypatch, tmp_path):
    """The bounds the issue asks for, as granian is started (no server is run here)."""
    import granian.server

    from dataset_server.engines import CONFIG_ENV, run_granian
    from dataset_server.server import ServeConfig

    started: dict = {}

    class FakeServer:
        def __init__(self, target, **kwargs):
            started.update(kwargs, target=target)

        def serve(self):
            started["served"] = True

    monkeypatch.setattr(granian.server, "Server", FakeServer)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    config = ServeConfig(root=str(tmp_path), port=8123, workers=3)
    run_granian(config)
    assert started["served"] and started["factory"] and started["workers"] == 3
    assert started["target"] == "dataset_server.server:app_from_env"
    assert started["http"] == "1"  # no HTTP/2: its 16 MiB header limit would bypass ours
    assert started["http1_settings"].header_read_timeout == config.keep_alive_s * 1000
    assert started["backlog"] == config.limit_concurrency
    assert started["workers_kill_timeout"] == config.graceful_s
    assert not started["log_access"]  # ours is the app's AccessLog
    assert os.environ[CONFIG_ENV] and '"max_header_bytes": 65536' in os.environ[CONFIG_ENV]
