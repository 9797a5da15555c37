"""A serve root on an object store (moto's S3 server on 127.0.0.1): the API, pages and access
rules from the store, file bytes by redirects to signed URLs, the real clients through it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.test_server_support import (
    REPO_ROOT,
    build_root,
    client_env,
    request,
    run_client,
    serving,
)

pytest.importorskip("s3fs")
DS = "/datasets/lab/ds/resolve"
TOKENS = {"datasets": {"lab/private": ["s3cret"]}}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    """GET ``url`` following redirects (urllib keeps Range on the way)."""
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as reply:
        return reply.status, reply.read()


@pytest.fixture
def store(make_dataset, tmp_path, moto_s3):
    """(local root, s3 URL, app options): lab/ds and lab/private, on disk and on the store."""
    root = build_root(make_dataset, tmp_path / "root", ("lab/ds",), n_train=40, n_test=10, shard_size=10)
    build_root(make_dataset, root, ("lab/private",), n_train=20, n_test=10, shard_size=10)
    for repo in ("lab/ds", "lab/private"):
        moto_s3(root / repo, f"sets/{repo}")
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    return root, "s3://bucket/sets", {"storage_options": moto_s3.options, "tokens": tokens}


def get_json(url: str, path: str, **headers) -> tuple[int, dict, object]:
    status, hdrs, body = request(url, "GET", path, headers=headers)
    return status, hdrs, json.loads(body)


def test_the_api_pages_and_samples_of_a_store_root_are_those_of_the_same_files_on_disk(store):
    from cifar5m.dataset_server.app import create_app

    root, s3_url, options = store
    answers = []
    for served_root, extra in ((root, {"tokens": options["tokens"]}), (s3_url, options)):
        with serving(create_app(root=served_root, page_size=3, **extra)) as url:
            info = get_json(url, "/api/datasets/lab/ds")[2]
            tree = get_json(url, f"/api/datasets/lab/ds/tree/{info['sha']}")[2]
            paths = request(url, "POST", "/api/datasets/lab/ds/paths-info/main",
                            body=b"paths=index.parquet&paths=train-000001.tar",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})[2]
            listed = [d["id"] for d in get_json(url, "/api/datasets")[2]]
            page = request(url, "GET", "/datasets/lab/ds")
            png = request(url, "GET", f"/datasets/lab/ds/samples/3.png?rev={info['sha']}")
            answers.append((info["sha"], info["siblings"], info["cardData"], tree, json.loads(paths), listed,
                            page[0], png[0], png[2]))
    assert answers[0] == answers[1]
    assert answers[1][5] == ["lab/ds"] and answers[1][6:8] == (200, 200)  # private: not listed
    assert answers[1][8].startswith(b"\x89PNG")


def test_files_are_redirects_to_signed_urls_carrying_what_the_hub_clients_read(store):
    from cifar5m.dataset_server.app import create_app

    root, s3_url, options = store
    shard = (root / "lab/ds/train-000001.tar").read_bytes()
    with serving(create_app(root=s3_url, **options)) as url:
        sha = get_json(url, "/api/datasets/lab/ds")[2]["sha"]
        for method in ("HEAD", "GET"):
            status, headers, body = request(url, method, f"{DS}/{sha}/train-000001.tar")
            assert status == 302 and body == b""
            assert headers["x-repo-commit"] == sha
            assert headers["x-linked-etag"] == headers["etag"] == f'"{sha256(shard)}"'
            assert headers["x-linked-size"] == str(len(shard))
            assert headers["location"].startswith(options["storage_options"]["client_kwargs"]["endpoint_url"])
            assert "X-Amz-Expires=300" in headers["location"]
        assert fetch(headers["location"]) == (200, shard)
        assert fetch(f"{url}{DS}/main/train-000001.tar", {"Range": "bytes=100-199"}) == (206, shard[100:200])
        # Small git files come from the copy read at the scan; conditions before any URL is signed.
        readme = (root / "lab/ds/README.md").read_bytes()
        assert request(url, "GET", f"{DS}/main/README.md")[::2] == (200, readme)
        assert request(url, "GET", f"{DS}/main/README.md", headers={"Range": "bytes=0-9"})[::2] == (206, readme[:10])
        status, headers, _ = request(url, "GET", f"{DS}/main/train-000001.tar",
                                     headers={"If-None-Match": f'"{sha256(shard)}"'})
        assert status == 304 and "location" not in headers
        status, headers, _ = request(url, "GET", f"{DS}/main/train-000001.tar", headers={"Range": "bytes=999999-"})
        assert status == 416 and "location" not in headers
        # A private dataset: not found, and nothing signed, without its token.
        private = "/datasets/lab/private/resolve/main/train-000000.tar"
        for headers_sent in ({}, {"Authorization": "Bearer nope"}):
            status, headers, _ = request(url, "GET", private, headers=headers_sent)
            assert (status, headers["x-error-code"]) == (401, "RepoNotFound") and "location" not in headers
        status, headers, _ = request(url, "GET", private, headers={"Authorization": "Bearer s3cret"})
        assert status == 302 and fetch(headers["location"])[1] == (root / "lab/private/train-000000.tar").read_bytes()


def test_a_store_that_does_not_answer_is_a_503_not_a_traceback(store, monkeypatch):
    from cifar5m.core.errors import StoreError
    from cifar5m.dataset_server.app import create_app
    from cifar5m.dataset_server.store_root import StoreRepo

    def down(*_):
        raise StoreError("the store is down")

    _, s3_url, options = store
    with serving(create_app(root=s3_url, **options)) as url:
        monkeypatch.setattr(StoreRepo, "signed_url", down)
        status, headers, _ = request(url, "GET", f"{DS}/main/train-000000.tar")
        assert status == 503 and "retry later" in headers["x-error-message"] and "location" not in headers
        monkeypatch.setattr(StoreRepo, "_listing", down)
        assert request(url, "GET", "/api/datasets/lab/ds")[0] == 503


def test_a_replaced_object_is_never_signed_for_the_commit_it_is_not_part_of(store, moto_s3, make_dataset):
    from cifar5m.dataset_server.app import create_app

    root, s3_url, options = store
    other = make_dataset("other", n_train=40, n_test=10, shard_size=10, seed=7)  # same sizes, other bytes
    with serving(create_app(root=s3_url, scan_max_age=0.0, **options)) as url:
        old = get_json(url, "/api/datasets/lab/ds")[2]["sha"]
        moto_s3.put(other / "train-000001.tar", "sets/lab/ds/train-000001.tar")
        status, headers, _ = request(url, "GET", f"{DS}/{old}/train-000001.tar")
        assert (status, headers["x-error-code"]) == (404, "RevisionNotFound") and "location" not in headers
        status, headers, _ = request(url, "HEAD", f"{DS}/main/train-000001.tar")
        new = (other / "train-000001.tar").read_bytes()
        assert status == 302 and headers["x-repo-commit"] != old and headers["x-linked-etag"] == f'"{sha256(new)}"'
        # A new manifest ahead of its shards (as `aws s3 sync` uploads): the listing keeps the
        # sha256 of the bytes there, not the one the manifest claims.
        moto_s3.put(other / "manifest.json", "sets/lab/ds/manifest.json")
        siblings = {s["rfilename"]: s for s in get_json(url, "/api/datasets/lab/ds")[2]["siblings"]}
        here = (root / "lab/ds/train-000000.tar").read_bytes()
        assert siblings["train-000000.tar"]["lfs"]["sha256"] == sha256(here) != sha256(
            (other / "train-000000.tar").read_bytes())


def test_a_version_aware_store_signs_the_object_version_itself(store, moto_s3, make_dataset):
    from cifar5m.dataset_server.app import create_app

    root, _, options = store
    moto_s3.client.create_bucket(Bucket="versioned")
    moto_s3.client.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})
    moto_s3(root / "lab/ds", "sets/lab/ds", bucket="versioned")
    shard = (root / "lab/ds/train-000000.tar").read_bytes()
    aware = {**options, "storage_options": {**options["storage_options"], "version_aware": True}}
    with serving(create_app(root="s3://versioned/sets", **aware)) as url:
        status, headers, _ = request(url, "HEAD", f"{DS}/main/train-000000.tar")
        assert status == 302 and "versionId=" in headers["location"]
        moto_s3.put(make_dataset("other", seed=7) / "train-000000.tar", "sets/lab/ds/train-000000.tar",
                    bucket="versioned")
        assert fetch(headers["location"]) == (200, shard)  # the version signed, not the new bytes


HUB_SCRIPT = r"""
import hashlib, json
from pathlib import Path
import datasets
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
out = {}
snap = Path(snapshot_download("lab/ds", repo_type="dataset"))
out["snapshot"] = {p.name: digest(p) for p in snap.iterdir()}
sha = HfApi().dataset_info("lab/ds").sha
out["by_sha"] = digest(hf_hub_download("lab/ds", "train-000001.tar", repo_type="dataset", revision=sha,
                                       local_dir="by-sha"))
priv = snapshot_download("lab/private", repo_type="dataset", token="s3cret", local_dir="private")
out["private"] = sorted(p.name for p in Path(priv).iterdir() if p.is_file())
ds = datasets.load_dataset("lab/ds", streaming=True)
out["labels"] = {s: [r["cls"] for r in ds[s]] for s in ("train", "test")}
print(json.dumps(out))
"""


def test_huggingface_hub_and_datasets_read_a_store_root(store, tmp_path):
    from cifar5m.dataset_server.app import create_app

    root, s3_url, options = store
    files = {p.name: sha256(p.read_bytes()) for p in (root / "lab/ds").iterdir() if p.is_file()}
    with serving(create_app(root=s3_url, **options)) as url:
        out = run_client(HUB_SCRIPT, url, tmp_path, timeout=240)
    assert out["snapshot"] == files and out["by_sha"] == files["train-000001.tar"]
    assert "train-000000.tar" in out["private"] and "manifest.json" in out["private"]
    assert out["labels"] == {"train": [i % 10 for i in range(40)], "test": [i % 10 for i in range(40, 50)]}


def test_cifar5m_serve_download_and_stream_through_a_store_with_aws_endpoint_url(store, moto_s3, tmp_path):
    """The CLI as a user runs it: credentials and endpoint from the AWS variables alone."""
    from tests.test_server_cli import start

    root, s3_url, options = store
    endpoint = options["storage_options"]["client_kwargs"]["endpoint_url"]
    aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc, url = start(s3_url, "--workers", "1", "--tokens", str(options["tokens"]), env=aws)
    try:
        env = {**client_env(url, tmp_path), **aws}
        cli = [sys.executable, "-m", "cifar5m"]
        done = subprocess.run([*cli, "download", "lab/private", "--endpoint", url, "--token", "s3cret",
                               "--local-dir", str(tmp_path / "got")], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0 and "verified" in done.stdout, done.stderr
        tar = ["--batch-size", "10", "--seed", "3", "--format", "tar"]
        remote = subprocess.run([*cli, "stream", f"{url}/datasets/lab/ds/resolve/main", *tar], cwd=REPO_ROOT,
                                env=env, capture_output=True, timeout=180)
        local = subprocess.run([*cli, "stream", str(root / "lab/ds"), *tar], cwd=REPO_ROOT, env=env,
                               capture_output=True, timeout=180)
        assert remote.returncode == 0, remote.stderr.decode()[-2000:]
        assert remote.stdout == local.stdout and len(local.stdout) > 40 * 1024
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert "serving lab/ds: 8 files" in log and "302" in log


@pytest.mark.parametrize(("args", "message"), [
    (["s3://bucket/nothing-here"], "no dataset to serve in s3://bucket/nothing-here"),
    (["memory://somewhere"], "cannot make signed URLs"),
    (["s3://bucket/sets", "--accel-redirect", "/x/"], "--accel-redirect is for a local ROOT"),
    (["s3://bucket/sets", "--storage-options", "[1]"], "--storage-options must be a JSON object"),
])
def test_a_store_root_that_cannot_be_served_is_one_error_line(store, args, message):
    _, _, options = store
    endpoint = options["storage_options"]["client_kwargs"]["endpoint_url"]
    env = {**client_env("http://unused", Path(".")), "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    out = subprocess.run([sys.executable, "-m", "cifar5m", "serve", *args], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    lines = [line for line in out.stderr.splitlines() if line.startswith("Error")]
    assert out.returncode != 0 and len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr
