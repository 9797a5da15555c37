"""Access rules and hostile requests: symlinked aliases, control characters, deep JSON,
conditional requests (RFC 9110), HTTP versions, and an unreadable manifest's reason."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from cifar5m.dataset_server.app import create_app
from tests.test_server_support import build_root, request, served, serving

__all__ = ["served"]  # the fixture, imported for pytest

DS = "/datasets/lab/ds/resolve/main"


def raw_exchange(url: str, data: bytes) -> bytes:
    """Send ``data`` as is; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(data)
        out = bytearray()
        while chunk := sock.recv(65536):
            out += chunk
    return bytes(out)


@pytest.fixture
def secured(make_dataset, tmp_path):
    root = build_root(make_dataset, tmp_path / "root", ("lab/private", "lab/public"),
                      n_train=20, n_test=10, shard_size=10)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("datasets:\n  lab/private: [s3cret]\n")
    return root, tokens


def test_a_symlinked_alias_never_serves_a_dataset_past_its_token(secured):
    root, tokens = secured
    os.symlink("private", root / "lab" / "alias")  # another name for the private dataset
    os.symlink("lab", root / "lab2")  # another org holding it
    os.symlink("public", root / "lab" / "pub-alias")
    readme = "/resolve/main/README.md"
    with serving(create_app(root=root, tokens=tokens)) as url:
        for auth in ({}, {"Authorization": "Bearer s3cret"}):
            for repo in ("lab/alias", "lab2/private", "lab2/public", "lab/pub-alias"):
                for path in (f"/datasets/{repo}{readme}", f"/api/datasets/{repo}", f"/datasets/{repo}"):
                    status, _headers, body = request(url, "GET", path, headers=auth)
                    assert status == 401 and b"s3cret" not in body and b"---" not in body, (path, auth)
            listed = {d["id"] for d in json.loads(request(url, "GET", "/api/datasets", headers=auth)[2])}
            assert listed == ({"lab/public", "lab/private"} if auth else {"lab/public"})
        # The real names are served as before.
        assert request(url, "GET", f"/datasets/lab/private{readme}", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert request(url, "GET", f"/datasets/lab/public{readme}")[0] == 200


@pytest.mark.parametrize("bad", ["%00", "%7f", "%1b", "%0d%0a", "%c2%85"])
def test_control_characters_get_a_clean_error_and_the_connection_goes_on(served, bad):
    url, _ = served
    paths = [f"{DS}/a{bad}b.tar", f"/datasets/lab/x{bad}y/resolve/main/README.md",
             f"/datasets/lab/ds/resolve/r{bad}ev/README.md", f"/api/datasets/lab/ds/tree/main/d{bad}"]
    for path in paths:
        pipelined = (f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"
                     "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode()
        reply = raw_exchange(url, pipelined)
        first, _, rest = reply.partition(b"\r\n\r\n")
        assert first.split(b" ", 2)[1] in (b"400", b"404"), (path, reply[:300])
        message = [line for line in first.split(b"\r\n") if line.lower().startswith(b"x-error-message:")]
        assert message and all(32 <= c < 127 for c in message[0]), (path, first)
        assert rest.count(b"HTTP/1.1 200 OK") == 1 and rest.endswith(b"true}"), reply[-300:]


def test_json_nested_too_deep_is_a_400(served):
    url, _ = served
    body = b"[" * 200_000
    status, _headers, out = request(url, "POST", "/api/datasets/lab/ds/paths-info/main", body=body,
                                   headers={"Content-Type": "application/json"})
    assert status == 400 and "form-encoded" in json.loads(out)["error"]


def test_if_range_and_if_match_follow_rfc_9110(served):
    url, root = served
    data = (root / "lab/ds/train-000001.tar").read_bytes()
    path = f"{DS}/train-000001.tar"
    head = request(url, "HEAD", path)[1]
    etag, date = head["etag"], head["last-modified"]
    for validator, want in ((etag, 206), (date, 206), ('"0123stale"', 200), (f"W/{etag}", 200),
                            ("Thu, 01 Jan 1970 00:00:00 GMT", 200)):
        status, headers, body = request(url, "GET", path, headers={"Range": "bytes=10-19", "If-Range": validator})
        assert (status, body) == ((206, data[10:20]) if want == 206 else (200, data)), validator
    for if_match, want in ((etag, 200), ("*", 200), (f'"x", {etag}', 200), ('"0123stale"', 412),
                           (f"W/{etag}", 412)):
        status, headers, body = request(url, "GET", path, headers={"If-Match": if_match})
        assert status == want, if_match
        assert body == data if want == 200 else headers["etag"] == etag
    # If-Match is checked before Range: a changed file is never patched into a resume.
    status, _, _ = request(url, "GET", path, headers={"If-Match": '"0123stale"', "Range": "bytes=0-9"})
    assert status == 412


@pytest.mark.parametrize("line", [b"GET /healthz HTTP/2.0", b"GET /healthz HTTP/0.9", b"GET /healthz"])
def test_other_http_versions_get_505_in_an_http_1_1_status_line(served, line):
    url, _ = served
    reply = raw_exchange(url, line + b"\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 505 ") or reply.startswith(b"HTTP/1.1 400 "), reply[:200]


def test_a_newer_manifest_reaches_the_http_reader_as_its_reason(make_dataset, tmp_path):
    from cifar5m.core.errors import DownloadError
    from cifar5m.shards.format import FORMAT_VERSION
    from cifar5m.shards.reader import Dataset
    from cifar5m.shards.source import open_source

    root = build_root(make_dataset, tmp_path / "root", ("lab/ds", "lab/new"), n_train=20, n_test=10, shard_size=10)
    manifest = root / "lab/new/manifest.json"
    doc = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**doc, "version": FORMAT_VERSION + 1}))
    with serving(create_app(root=root)) as url:
        source = open_source(f"{url}/datasets/lab/new/resolve/main")
        with pytest.raises(DownloadError, match=f"answered HTTP 501: .*format version {FORMAT_VERSION + 1}.*upgrade cifar5m") as info:
            source.read_file("manifest.json")
        assert str(Path(root)) not in str(info.value)  # the dataset's name, not the server's path
        # cifar5m.shards.reader.Dataset reads through the same source: the reason, not a bare status.
        with pytest.raises(DownloadError, match=f"answered HTTP 501: .*format version {FORMAT_VERSION + 1}.*upgrade cifar5m"):
            Dataset(f"{url}/datasets/lab/new/resolve/main")
        status, headers, _ = request(url, "GET", "/api/datasets/lab/new")
        assert (status, headers["x-error-code"]) == (501, "DatasetUnreadable")


def test_a_root_that_is_one_dataset_serves_nothing_beside_it(make_dataset, tmp_path):
    """``cifar5m serve DIR`` serves DIR as local/<name> and nothing else of its parent folder,
    not even a <parent>/local/<name> dataset while DIR's manifest is briefly missing."""
    from cifar5m.dataset_server.repo import Library

    ds = make_dataset("ds", n_train=10, n_test=0)
    make_dataset("other", n_train=10, n_test=0)
    build_root(make_dataset, tmp_path, ("local/ds",), n_train=10, n_test=0)
    library = Library(ds)
    assert [r.repo_id for r in library.repos()] == ["local/ds"] and library.get("local", "ds").dir == ds
    assert library.get("local", "other") is None
    (ds / "manifest.json").rename(tmp_path / "manifest.json")
    assert library.get("local", "ds") is None and library.repos() == []
