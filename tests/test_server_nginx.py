"""nginx in front of ``cifar5m serve --accel-redirect``, with the config of docs/serving.md: the
clients get the same answers as from cifar5m serve alone, while nginx sends the bytes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cifar5m.dataset_server import nginx
from tests.test_server_support import (
    REPO_ROOT,
    build_root,
    free_port,
    request,
    run_client,
    serving,
    wait_http,
)

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
DS = "/datasets/lab/ds/resolve"
TOKENS = {"datasets": {"lab/private": ["s3cret"], "lab/gated": {"gated": True, "tokens": ["g4ted"]}}}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_docs_hold_the_config_the_tests_run():
    text = (REPO_ROOT / "docs/serving.md").read_text()
    assert f"```nginx\n{nginx.SITE}```" in text


@contextmanager
def fronted(root: Path, tmp: Path, **options) -> Iterator[tuple[str, str]]:
    """cifar5m serve (in a thread) behind a real nginx with the docs' config: the URLs of nginx
    and of cifar5m serve."""
    from cifar5m.dataset_server.app import create_app

    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    with serving(create_app(root=root, accel_redirect=nginx.PREFIX, **options)) as upstream:
        port = free_port()
        site = nginx.site_config(root=root, listen=f"127.0.0.1:{port}", upstream=upstream.removeprefix("http://"))
        conf = nginx.main_config(tmp, site)
        proc = subprocess.Popen([NGINX, "-c", str(conf), "-e", str(tmp / "nginx-error.log")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", proc, seconds=30)
            yield f"http://127.0.0.1:{port}", upstream
        finally:
            proc.terminate()
            proc.wait(30)


@pytest.fixture
def front(make_dataset, tmp_path) -> Iterator[tuple[str, Path, str]]:
    root = build_root(make_dataset, tmp_path / "root", ("lab/ds",), n_train=40, n_test=10, shard_size=10)
    build_root(make_dataset, root, ("lab/private", "lab/gated"), n_train=20, n_test=10, shard_size=10)
    shutil.move(str(make_dataset("flat", n_train=20, n_test=10, shard_size=10)), str(root / "flat"))  # local/flat
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    (tmp_path / "nginx").mkdir()
    with fronted(root, tmp_path / "nginx", tokens=tokens, scan_max_age=0.0) as (url, upstream):
        yield url, root, upstream


def test_nginx_sends_whole_files_ranges_and_the_headers_the_clients_need(front):
    url, root, upstream = front
    shard = (root / "lab/ds/train-000001.tar").read_bytes()
    sha = json.loads(request(url, "GET", "/api/datasets/lab/ds")[2])["sha"]
    status, headers, body = request(upstream, "GET", f"{DS}/main/train-000001.tar")  # nginx sends the bytes
    assert (status, body, headers["x-accel-redirect"]) == (200, b"", "/_cifar5m_files/lab/ds/train-000001.tar")
    status, headers, body = request(url, "GET", f"{DS}/main/train-000001.tar")
    assert (status, body) == (200, shard) and "x-accel-redirect" not in headers
    assert headers["etag"] == f'"{sha256(shard)}"' and headers["x-repo-commit"] == sha
    assert headers["content-length"] == str(len(shard)) and headers["content-type"] == "application/x-tar"
    assert headers["accept-ranges"] == "bytes" and headers["cache-control"] == "no-cache"
    status, headers, body = request(url, "GET", f"{DS}/{sha}/train-000001.tar", headers={"Range": "bytes=100-199"})
    assert (status, body, headers["content-range"]) == (206, shard[100:200], f"bytes 100-199/{len(shard)}")
    assert headers["etag"] == f'"{sha256(shard)}"' and headers["x-repo-commit"] == sha
    for if_range, expected in ((f'"{sha256(shard)}"', (206, shard[:10])), ('"other"', (200, shard))):
        got = request(url, "GET", f"{DS}/main/train-000001.tar", headers={"Range": "bytes=0-9", "If-Range": if_range})
        assert got[::2] == expected
    # several ranges (a scattered subset) are answered by cifar5m itself, as multipart/byteranges
    status, headers, body = request(url, "GET", f"{DS}/main/train-000001.tar", headers={"Range": "bytes=0-1,5-6"})
    assert status == 206 and headers["content-type"].startswith("multipart/byteranges")
    assert "x-accel-redirect" not in headers
    for a, b in ((0, 1), (5, 6)):
        assert f"Content-Range: bytes {a}-{b}/{len(shard)}\r\n\r\n".encode() + shard[a:b + 1] in body
    assert request(url, "GET", f"{DS}/main/train-000001.tar",
                   headers={"If-Match": f'"{sha256(shard)}"'})[::2] == (200, shard)  # answered by cifar5m
    status, headers, body = request(url, "HEAD", f"{DS}/main/train-000001.tar")
    assert (status, body, headers["content-length"]) == (200, b"", str(len(shard)))
    flat = (root / "flat/README.md").read_bytes()  # root/<name>: local/<name>, its path under root
    assert request(url, "GET", "/datasets/local/flat/resolve/main/README.md")[::2] == (200, flat)


def test_a_root_that_is_one_dataset_folder_is_sent_by_nginx_too(make_dataset, tmp_path):
    ds = make_dataset("one", n_train=20, n_test=10, shard_size=10)
    (tmp_path / "nginx").mkdir()
    with fronted(ds, tmp_path / "nginx") as (url, upstream):
        status, _, body = request(url, "GET", "/datasets/local/one/resolve/main/train-000001.tar")
        assert (status, body) == (200, (ds / "train-000001.tar").read_bytes())
        assert request(upstream, "GET", "/datasets/local/one/resolve/main/train-000001.tar")[1][
            "x-accel-redirect"] == "/_cifar5m_files/train-000001.tar"


def test_nginx_passes_304_416_and_the_token_rules_and_hides_its_internal_location(front):
    url, root, _ = front
    shard = (root / "lab/ds/train-000000.tar").read_bytes()
    status, headers, body = request(url, "GET", f"{DS}/main/train-000000.tar",
                                    headers={"If-None-Match": f'"{sha256(shard)}"'})
    assert (status, body) == (304, b"") and headers["etag"] == f'"{sha256(shard)}"'
    status, headers, _ = request(url, "GET", f"{DS}/main/train-000000.tar", headers={"Range": "bytes=999999-"})
    assert (status, headers["content-range"]) == (416, f"bytes */{len(shard)}")
    private = "/datasets/lab/private/resolve/main/train-000000.tar"
    for token in (None, "nope"):
        status, headers, body = request(url, "GET", private, headers={"Authorization": f"Bearer {token}"} if token else {})
        assert (status, headers["x-error-code"]) == (401, "RepoNotFound") and b"ustar" not in body
    got = request(url, "GET", private, headers={"Authorization": "Bearer s3cret"})
    assert got[::2] == (200, (root / "lab/private/train-000000.tar").read_bytes())
    status, headers, _ = request(url, "GET", "/datasets/lab/gated/resolve/main/README.md")
    assert (status, headers["x-error-code"]) == (401, "GatedRepo")
    for path in ("/_cifar5m_files/lab/private/train-000000.tar", "/_cifar5m_files/lab/ds/manifest.json",
                 "/_cifar5m_files/", "/_cifar5m_files/../root/lab/ds/README.md"):
        status, _, body = request(url, "GET", path)
        assert status in (400, 404) and b"ustar" not in body, path


def test_a_file_replaced_on_disk_is_never_sent_for_the_commit_it_is_not_part_of(front, make_dataset):
    url, root, _ = front
    old = json.loads(request(url, "GET", "/api/datasets/lab/ds")[2])["sha"]
    new = (make_dataset("other", n_train=40, n_test=10, shard_size=10, seed=7) / "train-000001.tar").read_bytes()
    target = root / "lab/ds/train-000001.tar"
    (target.parent / ".swap.tmp").write_bytes(new)
    os.replace(target.parent / ".swap.tmp", target)  # as writers replace files: a new inode
    status, headers, body = request(url, "GET", f"{DS}/{old}/train-000001.tar")
    assert (status, headers["x-error-code"]) == (404, "RevisionNotFound") and new not in body
    status, headers, body = request(url, "GET", f"{DS}/main/train-000001.tar")
    assert (status, body, headers["etag"]) == (200, new, f'"{sha256(new)}"') and headers["x-repo-commit"] != old


HUB_SCRIPT = r"""
import hashlib, json
from pathlib import Path
from huggingface_hub import HfApi, HfFileSystem, hf_hub_download, snapshot_download
digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
snap = Path(snapshot_download("lab/ds", repo_type="dataset"))
sha = HfApi().dataset_info("lab/ds").sha
one = hf_hub_download("lab/ds", "train-000001.tar", repo_type="dataset", revision=sha, local_dir="by-sha")
with HfFileSystem().open(f"datasets/lab/ds@{sha}/train-000000.tar", "rb") as f:
    f.seek(1000); part = f.read(300).hex()
print(json.dumps({"snapshot": {p.name: digest(p) for p in snap.iterdir()}, "by_sha": digest(one), "part": part}))
"""


def test_huggingface_hub_downloads_through_nginx(front, tmp_path):
    url, root, _ = front
    out = run_client(HUB_SCRIPT, url, tmp_path)
    files = {p.name: sha256(p.read_bytes()) for p in (root / "lab/ds").iterdir() if p.is_file()}
    assert out["snapshot"] == files and out["by_sha"] == files["train-000001.tar"]
    assert out["part"] == (root / "lab/ds/train-000000.tar").read_bytes()[1000:1300].hex()
