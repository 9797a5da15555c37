"""``cifar5m download``: real snapshot_download against the server, verification, resume."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from cifar5m.dataset_server.app import create_app
from tests.test_server_support import build_root, client_env, request, serving


class Recorder:
    """Records (method, file, range) of every request to ``app`` and can cut or stall one file's body."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.calls: list[tuple[str, str, str]] = []
        self.drop_once: set[str] = set()  # close the connection after 1000 bytes, once
        self.stall: set[str] = set()  # send 1000 bytes, then nothing more
        app.middlewares.append(self.middleware)

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        name = request.path.rsplit("/", 1)[-1]
        self.calls.append((request.method, name, request.headers.get("Range", "")))
        response = await handler(request)
        if request.method != "GET" or not (name in self.drop_once or name in self.stall):
            return response
        stall = name in self.stall
        self.drop_once.discard(name)
        data = os.pread(response.fd, 1000, response.start)  # the file's FdResponse
        os.close(response.fd)
        cut = web.StreamResponse(status=response.status, headers=response.headers)
        await cut.prepare(request)
        await cut.write(data)
        if stall:
            await asyncio.sleep(3600)
        request.transport.close()  # test: connection dropped mid-file
        return cut

    def gets(self) -> list[str]:
        return [name for method, name, _ in self.calls if method == "GET" and "." in name]


def cli(args: list[str], url: str, home: Path, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cifar5m", "download", *args, "--endpoint", url]
    env = client_env(url, home) | {"HF_HUB_DOWNLOAD_TIMEOUT": "60"} | kwargs.pop("env", {})
    if kwargs.pop("background", False):
        return subprocess.Popen(cmd, env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True, timeout=120)


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    return names == sorted(p.name for p in b.iterdir() if p.is_file()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


@pytest.fixture
def root(make_dataset, tmp_path) -> Path:
    root = build_root(make_dataset, tmp_path / "root")
    build_root(make_dataset, root, ("lab/private",), n_train=20, n_test=10, shard_size=10)
    (tmp_path / "tokens.yaml").write_text("datasets:\n  lab/private: [s3cret]\n")
    return root


def test_download_verifies_and_a_rerun_fetches_nothing(root, tmp_path):
    app = Recorder(create_app(root=root))
    with serving(app.app) as url:
        done = cli(["lab/ds", "--local-dir", "out"], url, tmp_path)
        assert done.returncode == 0, done.stderr
        assert "lab/ds: 8 files" in done.stdout and "verified" in done.stdout
        assert same_files(root / "lab/ds", tmp_path / "out")
        first = app.gets()
        assert sorted(first) == sorted(p.name for p in (root / "lab/ds").iterdir() if p.is_file())
        app.calls.clear()
        again = cli(["lab/ds", "--local-dir", "out"], url, tmp_path)
        assert again.returncode == 0, again.stderr
        assert app.gets() == []  # complete files are not fetched again


def test_a_connection_dropped_mid_file_is_resumed(root, tmp_path):
    app = Recorder(create_app(root=root))
    app.drop_once.add("train-000001.tar")
    with serving(app.app) as url:
        done = cli(["lab/ds", "--local-dir", "out"], url, tmp_path)
    assert done.returncode == 0, done.stderr
    assert same_files(root / "lab/ds", tmp_path / "out")
    assert app.gets().count("train-000001.tar") == 2


def test_a_killed_download_completes_on_rerun_without_refetching(root, tmp_path):
    app = Recorder(create_app(root=root))
    app.stall.add("train-000002.tar")
    out = tmp_path / "out"
    meta = out / ".cache" / "cifar5m" / "incoming" / ".cache" / "huggingface" / "download"
    with serving(app.app) as url:
        proc = cli(["lab/ds", "--local-dir", "out", "--workers", "2"], url, tmp_path, background=True)
        others = [p.name for p in (root / "lab/ds").iterdir() if p.is_file() and p.name != "train-000002.tar"]
        deadline = time.monotonic() + 90
        while not (all((meta / f"{n}.metadata").is_file() for n in others)
                   and list(meta.glob("*.incomplete"))):
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError(f"download did not stall as planned: {proc.communicate()}")
            time.sleep(0.1)
        proc.kill()
        proc.communicate()
        assert not (out / "train-000002.tar").exists()
        app.stall.clear()
        app.calls.clear()
        done = cli(["lab/ds", "--local-dir", "out"], url, tmp_path)
        assert done.returncode == 0, done.stderr
        assert app.gets() == ["train-000002.tar"]
    assert same_files(root / "lab/ds", out)


def test_a_file_that_differs_from_the_manifest_is_named(root, tmp_path):
    shard = root / "lab/ds/train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01  # the server now serves (and hashes) other bytes than the manifest's
    shard.write_bytes(bytes(data))
    with serving(create_app(root=root)) as url:
        done = cli(["lab/ds", "--local-dir", "out"], url, tmp_path)
    assert done.returncode == 1
    assert "Error:" in done.stderr and "train-000000.tar does not match the sha256" in done.stderr


def test_a_repo_that_cannot_be_listed_is_an_error_even_after_another_download(root, tmp_path):
    """huggingface_hub hands back a non-empty local_dir unchanged when the repo cannot be
    listed; the staging folder of an earlier download must not pass for the missing repo."""
    with serving(create_app(root=root)) as url:
        assert cli(["lab/ds", "--local-dir", "out"], url, tmp_path).returncode == 0
        before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
        missing = cli(["lab/nope", "--local-dir", "out"], url, tmp_path)
        assert missing.returncode == 1 and "lab/nope" in missing.stderr and "--token" in missing.stderr
        assert "verified" not in missing.stdout
        assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before


def test_private_download_needs_the_token(root, tmp_path):
    with serving(create_app(root=root, tokens=tmp_path / "tokens.yaml")) as url:
        for bad in ("nope", "lab/ds/x", "/ds"):  # not <org>/<name>: one line, nothing written
            out = cli([bad, "--local-dir", "p0"], url, tmp_path)
            assert out.returncode == 1 and out.stderr.strip().splitlines() == [
                f"Error: {bad!r} is not a dataset id: use <org>/<name>, e.g. local/cifar10"], out.stderr
            assert not (tmp_path / "p0").exists()
        denied = cli(["lab/private", "--local-dir", "p1"], url, tmp_path)
        assert denied.returncode == 1 and "not found" in denied.stderr and "--token" in denied.stderr
        done = cli(["lab/private", "--local-dir", "p2", "--token", "s3cret"], url, tmp_path)
        assert done.returncode == 0, done.stderr
    assert same_files(root / "lab/private", tmp_path / "p2")
    digest = hashlib.sha256((tmp_path / "p2/manifest.json").read_bytes()).hexdigest()
    assert digest == hashlib.sha256((root / "lab/private/manifest.json").read_bytes()).hexdigest()


def test_a_rerun_the_server_refuses_is_an_error_not_the_old_copy(root, tmp_path):
    # huggingface_hub hands back what local_dir (or its cache) holds when it cannot list the
    # repo; a rerun without the token, or with the server gone, must not print "verified".
    with serving(create_app(root=root, tokens=tmp_path / "tokens.yaml")) as url:
        for where in (["--local-dir", "p"], []):
            assert cli(["lab/private", *where, "--token", "s3cret"], url, tmp_path).returncode == 0
            before = sorted(p.name for p in (tmp_path / "p").iterdir()) if where else None
            for token in ([], ["--token", "wrong"]):
                again = cli(["lab/private", *where, *token], url, tmp_path)
                assert again.returncode == 1 and "verified" not in again.stdout, again.stdout
                assert "not found" in again.stderr and "--token" in again.stderr
            if where:
                assert sorted(p.name for p in (tmp_path / "p").iterdir()) == before
    gone = cli(["lab/private", "--local-dir", "p", "--token", "s3cret"], url, tmp_path)
    assert gone.returncode == 1 and "verified" not in gone.stdout
    assert "connection refused" in gone.stderr or "cannot connect" in gone.stderr, gone.stderr


def test_a_pinned_commit_or_offline_mode_reruns_on_the_copy_it_has(root, tmp_path):
    # Neither can be stale: a commit sha names fixed bytes (the server may since have moved on
    # and no longer know it), and HF_HUB_OFFLINE=1 asks for the local copy.
    with serving(create_app(root=root)) as url:
        sha = json.loads(request(url, "GET", "/api/datasets/lab/ds")[2])["sha"]
        assert cli(["lab/ds", "--local-dir", "p", "--revision", sha], url, tmp_path).returncode == 0
        with open(root / "lab/ds/README.md", "a") as card:
            card.write("\nedited after the download\n")  # a new commit on the server
        assert json.loads(request(url, "GET", "/api/datasets/lab/ds")[2])["sha"] != sha
        again = cli(["lab/ds", "--local-dir", "p", "--revision", sha], url, tmp_path)
        assert again.returncode == 0 and "verified in p" in again.stdout, again.stderr
    offline = cli(["lab/ds", "--local-dir", "p"], url, tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0 and "verified in p" in offline.stdout, offline.stderr


def test_download_into_the_hub_cache_by_default(root, tmp_path):
    with serving(create_app(root=root)) as url:
        done = cli(["lab/ds"], url, tmp_path)
    assert done.returncode == 0, done.stderr
    snapshot = Path(done.stdout.strip().rsplit(" in ", 1)[1])
    assert snapshot.parent.name == "snapshots" and "datasets--lab--ds" in str(snapshot)
    assert same_files(root / "lab/ds", snapshot)
    assert not (snapshot / ".cache").exists()  # nothing of ours inside the hub cache


def test_a_rerun_against_a_corrupt_server_copy_keeps_the_good_local_file(root, tmp_path):
    app = Recorder(create_app(root=root))
    out = tmp_path / "out"
    with serving(app.app) as url:
        assert cli(["lab/ds", "--local-dir", "out"], url, tmp_path).returncode == 0
        good = (out / "train-000001.tar").read_bytes()
        served = root / "lab/ds/train-000001.tar"
        data = bytearray(served.read_bytes())
        data[900] ^= 0xFF  # the server's copy goes bad after the download
        served.write_bytes(bytes(data))
        app.calls.clear()
        again = cli(["lab/ds", "--local-dir", "out"], url, tmp_path)
        assert again.returncode == 0, again.stderr  # complete and matching: not fetched again
        assert app.gets() == [] and (out / "train-000001.tar").read_bytes() == good
        (out / "train-000001.tar").write_bytes(good[:5000])  # now the local copy is cut short too
        third = cli(["lab/ds", "--local-dir", "out"], url, tmp_path)
    assert third.returncode == 1
    line = [x for x in third.stderr.splitlines() if x.startswith("Error: ")]
    assert len(line) == 1 and "Traceback" not in third.stderr, third.stderr
    assert f"{url}/datasets/lab/ds/resolve/main/train-000001.tar does not match the sha256" in line[0]
    assert "left as it was" in line[0]
    assert (out / "train-000001.tar").read_bytes() == good[:5000]  # not replaced by the bad bytes
    assert not list(out.rglob("train-000001.tar.incomplete"))
    assert not (out / ".cache/cifar5m/incoming/train-000001.tar").exists()
