"""The dataset server over raw HTTP: API shapes, ranges, errors, tokens, traversal, limits."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from cifar5m.dataset_server.repo import DatasetRepo, HashCache, git_blob_sha1
from tests.test_server_support import build_root, request, served, serving

__all__ = ["served"]  # the fixture, imported for pytest

DS = "/datasets/lab/ds/resolve/main"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def info(url: str, rev: str | None = None, **headers) -> tuple[int, dict, dict]:
    path = "/api/datasets/lab/ds" + (f"/revision/{quote(rev, safe='')}" if rev else "")
    status, hdrs, body = request(url, "GET", path, headers=headers)
    return status, hdrs, json.loads(body)


def test_info_has_id_sha_siblings_and_card(served):
    url, root = served
    status, _, doc = info(url)
    assert status == 200
    assert doc["id"] == "lab/ds" and len(doc["sha"]) == 40 and int(doc["sha"], 16) >= 0
    manifest = json.loads((root / "lab/ds/manifest.json").read_text())
    expected = {s["file"]: s["sha256"] for s in manifest["shards"]}
    expected |= {f["file"]: f["sha256"] for f in manifest["files"]}
    siblings = {s["rfilename"]: s for s in doc["siblings"]}
    assert set(siblings) == set(expected) | {"manifest.json"}
    for name, sha in expected.items():
        data = (root / "lab/ds" / name).read_bytes()
        assert siblings[name]["size"] == len(data)
        if name.endswith((".tar", ".parquet")):
            assert siblings[name]["lfs"]["sha256"] == sha == sha256(data)
    assert doc["cardData"]["configs"][0]["data_files"][0] == {"split": "train", "path": "train-*.tar"}
    assert not any("xet" in k.lower() for k in json.dumps(doc).split('"'))
    # The same commit by branch and by sha; an unknown revision is typed.
    assert info(url, "main")[2]["sha"] == doc["sha"] == info(url, doc["sha"])[2]["sha"]
    status, headers, body = info(url, "refs/pr/1")
    assert (status, headers["x-error-code"]) == (404, "RevisionNotFound") and "error" in body


def test_tree_pages_follow_absolute_links_and_oids_are_right(served):
    url, root = served  # page_size=3: 8 files -> 3 pages
    sha = info(url)[2]["sha"]
    entries, path, pages = [], f"/api/datasets/lab/ds/tree/{sha}?recursive=true&expand=false", 0
    while path:
        status, headers, body = request(url, "GET", path)
        assert status == 200
        entries += json.loads(body)
        pages += 1
        link = headers.get("link")
        path = None
        if link:
            target = link.split(";")[0].strip("<> ")
            assert target.startswith(url) and "recursive=true" in target and 'rel="next"' in link
            parts = urlsplit(target)
            path = f"{parts.path}?{parts.query}"
    assert pages == 3
    names = [e["path"] for e in entries]
    assert sorted(names) == sorted(p.name for p in (root / "lab/ds").iterdir() if p.is_file())
    for e in entries:
        data = (root / "lab/ds" / e["path"]).read_bytes()
        assert e["type"] == "file" and e["size"] == len(data)
        if "lfs" in e:
            assert e["lfs"]["oid"] == sha256(data) and e["lfs"]["pointerSize"] > 0
        else:  # what `hf cache verify` compares plain files with
            assert e["oid"] == git_blob_sha1(data)
    # A sub-path is sent as one %2F-encoded part; a file gives its own entry.
    status, _, body = request(url, "GET", "/api/datasets/lab/ds/tree/main/README.md")
    assert status == 200 and [e["path"] for e in json.loads(body)] == ["README.md"]
    status, headers, _ = request(url, "GET", "/api/datasets/lab/ds/tree/main/nope%2Fdir")
    assert (status, headers["x-error-code"], headers["x-repo-commit"]) == (404, "EntryNotFound", sha)


def test_paths_info_returns_existing_paths_and_bounds_the_body(served):
    url, _ = served
    body = b"paths=README.md&paths=missing&paths=train-000001.tar&expand=false"
    status, _, out = request(url, "POST", "/api/datasets/lab/ds/paths-info/main", body=body,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200
    assert [e["path"] for e in json.loads(out)] == ["README.md", "train-000001.tar"]
    big = b"paths=" + b"a" * (1024 * 1024 + 1)
    status, _, _ = request(url, "POST", "/api/datasets/lab/ds/paths-info/main", body=big)
    assert status == 413
    # A claimed length over the bound is refused before any byte of the body is read.
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"POST /api/datasets/lab/ds/paths-info/main HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 1000000000000\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 413 ")


def test_resolve_head_and_get_carry_commit_etag_and_real_length(served):
    url, root = served
    data = (root / "lab/ds/train-000000.tar").read_bytes()
    sha = info(url)[2]["sha"]
    for method in ("HEAD", "GET"):
        status, headers, body = request(url, method, f"{DS}/train-000000.tar",
                                        headers={"Accept-Encoding": "gzip, deflate"})
        assert status == 200
        assert headers["x-repo-commit"] == sha
        assert headers["etag"] == f'"{sha256(data)}"'
        assert headers["content-length"] == str(len(data))
        assert headers["accept-ranges"] == "bytes"
        assert "content-encoding" not in headers
        assert not any(k.startswith("x-xet") for k in headers)
        assert body == (data if method == "GET" else b"")
    etag = f'"{sha256(data)}"'
    status, headers, body = request(url, "GET", f"{DS}/train-000000.tar", headers={"If-None-Match": etag})
    assert (status, body, headers["etag"]) == (304, b"", etag)
    # By commit sha too, and a revision that is neither main nor the sha is typed.
    assert request(url, "GET", f"/datasets/lab/ds/resolve/{sha}/train-000000.tar")[2] == data
    status, headers, _ = request(url, "HEAD", "/datasets/lab/ds/resolve/" + "a" * 40 + "/README.md")
    assert (status, headers["x-error-code"]) == (404, "RevisionNotFound")


@pytest.mark.parametrize(("spec", "start", "end"), [
    ("bytes=0-0", 0, 1), ("bytes=100-611", 100, 612), ("bytes=1000-", 1000, None),
    ("bytes=-10", -10, None), ("bytes=5-99999999", 5, None), ("bytes=-99999999", 0, None),
])
def test_ranges(served, spec, start, end):
    url, root = served
    data = (root / "lab/ds/train-000001.tar").read_bytes()
    status, headers, body = request(url, "GET", f"{DS}/train-000001.tar", headers={"Range": spec})
    want = data[start:end]
    first = len(data) + start if start < 0 else start
    assert status == 206 and body == want
    assert headers["content-length"] == str(len(want))
    assert headers["content-range"] == f"bytes {first}-{first + len(want) - 1}/{len(data)}"
    assert headers["etag"] == f'"{sha256(data)}"'


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_ranges_that_stop_before_the_end_are_read_without_read_ahead(served, monkeypatch):
    # Cold page cache: the kernel's read-ahead (up to read_ahead_kb, 8 MB on some machines)
    # made many small ranges read several times the bytes asked for. Only the request's
    # own descriptor is advised, and only for a range that stops before the end.
    import cifar5m.dataset_server.resolve as resolve_module

    advised: list[tuple[int, int, int]] = []

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        os.fstat(fd)  # the descriptor the body is sent from is open
        advised.append((offset, length, advice))
        os.posix_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(resolve_module, "_FADVISE", fadvise)
    url, root = served
    data = (root / "lab/ds/train-000001.tar").read_bytes()
    status, _, body = request(url, "GET", f"{DS}/train-000001.tar", headers={"Range": "bytes=100-611"})
    assert (status, body, advised) == (206, data[100:612], [(0, 0, os.POSIX_FADV_RANDOM)])
    for headers in ({}, {"Range": "bytes=1000-"}, {"Range": "bytes=-10"}, {"Range": f"bytes=0-{len(data) - 1}"}):
        status, _, body = request(url, "GET", f"{DS}/train-000001.tar", headers=headers)
        assert status in (200, 206) and data.endswith(body)
    assert len(advised) == 1  # whole files and ranges to the end keep the sequential read-ahead


def test_range_past_the_end_is_416_and_bad_ranges_are_ignored(served):
    url, root = served
    size = (root / "lab/ds/train-000001.tar").stat().st_size
    for spec in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=-0"):
        for method in ("GET", "HEAD"):
            status, headers, _ = request(url, method, f"{DS}/train-000001.tar", headers={"Range": spec})
            assert status == 416 and headers["content-range"] == f"bytes */{size}"
    for spec in ("bytes=9-3", "items=0-5", "bytes=a-b", "bytes=0-1,7-5", "bytes=0-1,-5"):
        status, headers, body = request(url, "GET", f"{DS}/train-000001.tar", headers={"Range": spec})
        assert status == 200 and len(body) == size == int(headers["content-length"])


def test_several_ranges_come_back_as_one_multipart_body(served):
    from cifar5m.shards.connections import Connections, Piece

    url, root = served
    data = (root / "lab/ds/train-000001.tar").read_bytes()
    status, headers, body = request(url, "GET", f"{DS}/train-000001.tar",
                                    headers={"Range": f"bytes=0-9,100-199,{len(data) - 5}-{len(data) + 99}"})
    assert status == 206 and headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert f"Content-Range: bytes 100-199/{len(data)}".encode() in body
    wanted = [(0, 10), (100, 200), (5000, 5003), (len(data) - 5, len(data) + 100)]
    pieces = [Piece(a, memoryview(bytearray(b - a))) for a, b in wanted]
    reply = Connections().get_range(f"{url}{DS}/train-000001.tar", {}, pieces, multi=True)
    assert reply.status == 206 and [bytes(p.data()) for p in pieces] == [data[a:b] for a, b in wanted]
    spec = f"bytes={len(data)}-{len(data) + 1},{len(data) + 5}-{len(data) + 9}"
    status, headers, _ = request(url, "GET", f"{DS}/train-000001.tar", headers={"Range": spec})
    assert status == 416 and headers["content-range"] == f"bytes */{len(data)}"


def test_missing_file_and_repo_are_typed(served):
    url, _ = served
    sha = info(url)[2]["sha"]
    status, headers, body = request(url, "HEAD", f"{DS}/dataset_infos.json")
    assert (status, headers["x-error-code"], headers["x-repo-commit"]) == (404, "EntryNotFound", sha)
    status, headers, body = request(url, "GET", "/datasets/lab/nope/resolve/main/README.md")
    assert (status, headers["x-error-code"]) == (401, "RepoNotFound")
    assert json.loads(body)["error"].startswith("Repository not found")
    status, _, body = request(url, "GET", "/api/agent-harnesses")
    assert status == 200 and json.loads(body) == {"standardEnvVars": [], "harnesses": {}}


def test_traversal_never_serves_outside_files(served, tmp_path):
    url, root = served
    secret = b"TOP-SECRET-OUTSIDE-THE-DATASET"
    (tmp_path / "secret.txt").write_bytes(secret)
    (root / "secret.txt").write_bytes(secret)
    (root / "lab" / "secret.txt").write_bytes(secret)
    ds = root / "lab/ds"
    (ds / "notes.txt").write_bytes(secret)  # in the folder but not in the manifest
    (ds / "_work").mkdir()
    (ds / "_work" / "part.parquet").write_bytes(secret)
    # A listed shard replaced by a symlink to a file outside the dataset.
    (ds / "train-000003.tar").unlink()
    (ds / "train-000003.tar").symlink_to(tmp_path / "secret.txt")
    # A listed shard that is a symlink to a file inside the dataset is served.
    inside = (ds / "train-000002.tar").read_bytes()
    (ds / "train-000002.tar").rename(ds / "train-000002.tar.real")
    (ds / "train-000002.tar").symlink_to("train-000002.tar.real")
    assert request(url, "GET", f"{DS}/train-000002.tar")[2] == inside
    # A dataset folder symlinked out of ROOT.
    outside = tmp_path / "outside"
    outside.mkdir()
    for f in ds.iterdir():
        if f.is_file() and not f.is_symlink():
            (outside / f.name).write_bytes(f.read_bytes())
    (outside / "README.md").write_bytes(secret)
    (root / "lab" / "linked").symlink_to(outside)
    attempts = [
        f"{DS}/../../../secret.txt", f"{DS}/..%2F..%2F..%2Fsecret.txt", f"{DS}/%2e%2e/%2e%2e/secret.txt",
        f"{DS}/notes.txt", f"{DS}/_work/part.parquet", f"{DS}/_work%2Fpart.parquet",
        f"{DS}/train-000003.tar", f"{DS}/{quote(str(tmp_path / 'secret.txt'), safe='')}",
        f"{DS}/{tmp_path / 'secret.txt'}", f"{DS}//etc/passwd", f"{DS}/.",
        "/datasets/lab/../secret.txt", "/datasets/lab/%2e%2e/resolve/main/secret.txt",
        "/datasets/../lab/resolve/main/secret.txt", "/datasets/lab/linked/resolve/main/README.md",
        "/datasets/%2e%2e/lab/resolve/main/secret.txt", "/api/datasets/lab/linked/tree/main",
    ]
    for path in attempts:
        status, _, body = request(url, "GET", path)
        assert secret not in body, path
        # 401 only for a valid name that is not served (what any unknown dataset gets).
        assert status == (401 if "linked" in path else 404), (path, status)
    status, _, body = request(url, "GET", "/api/datasets/lab/ds/tree/main")
    assert {e["path"] for e in json.loads(body)} >= {"README.md"}
    assert not {"notes.txt", "train-000003.tar", "_work"} & {e["path"] for e in json.loads(body)}


def test_private_dataset_needs_its_token_and_hides_its_existence(make_dataset, tmp_path):
    from cifar5m.dataset_server.app import create_app

    root = build_root(make_dataset, tmp_path / "root", ("lab/private", "lab/gated", "lab/public"),
                      n_train=20, n_test=10, shard_size=10)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("datasets:\n  lab/private: [s3cret]\n  lab/gated: {gated: true, tokens: g4ted}\n")
    with serving(create_app(root=root, tokens=tokens)) as url:
        readme = "/resolve/main/README.md"
        for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer g4ted"}):
            for path in ("/api/datasets/lab/private", "/datasets/lab/private" + readme,
                         "/api/datasets/lab/private/tree/main"):
                status, headers, body = request(url, "GET", path, headers=auth)
                assert (status, headers["x-error-code"]) == (401, "RepoNotFound"), path
                # Word for word what a dataset that does not exist gets.
                missing = request(url, "GET", path.replace("private", "nothere"), headers=auth)
                assert body.replace(b"private", b"nothere") == missing[2]
        good = {"Authorization": "Bearer s3cret"}
        assert request(url, "GET", "/datasets/lab/private" + readme, headers=good)[0] == 200
        # Gated: described to anyone, files only with the token.
        status, _, body = request(url, "GET", "/api/datasets/lab/gated")
        assert status == 200 and json.loads(body)["gated"] == "manual"
        status, headers, _ = request(url, "GET", "/datasets/lab/gated" + readme)
        assert (status, headers["x-error-code"]) == (401, "GatedRepo")
        status, headers, _ = request(url, "GET", "/datasets/lab/gated" + readme, headers={"Authorization": "Bearer s3cret"})
        assert (status, headers["x-error-code"]) == (403, "GatedRepo")
        assert request(url, "GET", "/datasets/lab/gated" + readme, headers={"Authorization": "Bearer g4ted"})[0] == 200
        assert request(url, "GET", "/datasets/lab/public" + readme)[0] == 200
        listed = {d["id"] for d in json.loads(request(url, "GET", "/api/datasets")[2])}
        assert listed == {"lab/gated", "lab/public"}


def test_changing_a_file_changes_sha_and_etag(served):
    url, root = served
    ds = root / "lab/ds"
    sha0 = info(url)[2]["sha"]
    etag0 = request(url, "HEAD", f"{DS}/train-000000.tar")[1]["etag"]
    # Same size, one byte flipped in place: only the mtime tells, and the hash is redone.
    data = bytearray((ds / "train-000000.tar").read_bytes())
    data[600] ^= 0xFF
    (ds / "train-000000.tar").write_bytes(bytes(data))
    status, headers, body = request(url, "GET", f"{DS}/train-000000.tar")
    assert status == 200 and body == bytes(data) and headers["etag"] == f'"{sha256(bytes(data))}"' != etag0
    sha1 = headers["x-repo-commit"]
    assert sha1 != sha0 and info(url)[2]["sha"] == sha1
    assert request(url, "GET", f"/datasets/lab/ds/resolve/{sha0}/README.md")[1]["x-error-code"] == "RevisionNotFound"
    # Any other file changes the commit too, but not this file's ETag.
    (ds / "README.md").write_text((ds / "README.md").read_text() + "\nmore\n")
    sha2 = info(url)[2]["sha"]
    assert sha2 not in (sha0, sha1)
    assert request(url, "HEAD", f"{DS}/train-000000.tar")[1]["etag"] == headers["etag"]


def test_limits_on_headers_and_methods(served):
    url, _ = served
    many = {f"X-H{i}": "v" for i in range(150)}
    assert request(url, "GET", f"{DS}/README.md", headers=many)[0] == 431
    try:
        big = request(url, "GET", f"{DS}/README.md", headers={"X-Big": "v" * 100_000})[0]
    except ConnectionResetError:
        big = "reset"
    # aiohttp's parser refuses one header over max_header_bytes with 400 (and a close: the
    # client may see a reset).
    assert big in (400, "reset")
    assert request(url, "GET", f"{DS}/README.md?" + "q" * 10_000)[0] == 414
    assert request(url, "PUT", f"{DS}/README.md", body=b"x")[0] == 405
    assert request(url, "DELETE", "/api/datasets/lab/ds")[0] == 405


def test_unchanged_shards_take_their_hash_from_the_manifest(make_dataset, tmp_path, monkeypatch):
    root = build_root(make_dataset, tmp_path / "root")
    hashed: list[str] = []
    original = HashCache.hash_file

    def spy(self, path, st, *, git):
        hashed.append(Path(path).name)
        return original(self, path, st, git=git)

    monkeypatch.setattr(HashCache, "hash_file", spy)
    repo = DatasetRepo(root / "lab/ds", "lab/ds", HashCache())
    state = repo.scan()
    assert sorted(hashed) == ["README.md", "manifest.json"]  # small git files only
    shard = root / "lab/ds/train-000002.tar"
    assert state.files[shard.name].sha256 == sha256(shard.read_bytes())
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched after the manifest
    hashed.clear()
    assert repo.scan().sha == state.sha  # same bytes: same commit, after one re-hash
    assert repo.scan().sha == state.sha
    assert hashed == [shard.name]
