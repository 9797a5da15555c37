"""The server over datasets from elsewhere: no script from a manifest reaches a browser, a
file is never a page of this origin, a symlinked manifest shows nothing of its target, a
damaged dataset is one log line and no 500, and conditional requests are honoured."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from email.utils import formatdate
from pathlib import Path

import pytest

from cifar5m.dataset_server.app import SECURITY_HEADERS, create_app
from tests.test_server_support import build_root, request, serving

SCRIPT = "<script>alert(1)</script>"


@pytest.fixture
def root(make_dataset, tmp_path) -> Path:
    root = build_root(make_dataset, tmp_path / "root", ("lab/ds", "lab/private", "lab/gated"),
                      n_train=20, n_test=10, shard_size=10)
    (tmp_path / "tokens.yaml").write_text("datasets:\n  lab/private: [s3cret]\n"
                                          "  lab/gated: {gated: true, tokens: [g4ted]}\n")
    return root


def edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def add_file(folder: Path, name: str, data: bytes) -> None:
    (folder / name).write_bytes(data)
    edit_manifest(folder, lambda d: d["files"].append(
        {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


def test_manifest_strings_reach_pages_escaped(root, tmp_path):
    def edit(doc):
        doc["shards"][0]["split"] = SCRIPT
        doc["provenance"][SCRIPT] = SCRIPT
        doc["class_names"][0] = SCRIPT
    edit_manifest(root / "lab/ds", edit)
    edit_manifest(root / "lab/gated", lambda d: d.update(image_format=SCRIPT))  # unreadable: its reason
    edit_manifest(root / "lab/private", lambda d: d["shards"][0].update(sha256=SCRIPT))
    with serving(create_app(root=root, tokens=tmp_path / "tokens.yaml")) as url:
        pages = [request(url, "GET", path, headers={"Authorization": "Bearer s3cret"})
                 for path in ("/", "/datasets/lab/ds", "/datasets/lab/gated", "/datasets/lab/private")]
    assert [status for status, _, _ in pages] == [200, 200, 501, 501]
    for _, _, body in pages:
        assert b"<script" not in body, body
    assert pages[1][2].count(b"&lt;script&gt;alert(1)&lt;/script&gt;") >= 4  # split, class, provenance
    assert b"&lt;script&gt;" in pages[2][2] and b"&lt;script&gt;" in pages[3][2]  # the reasons, quoted


def test_pages_files_and_errors_carry_the_security_headers(root, tmp_path):
    paths = ["/", "/datasets/lab/ds", "/datasets/lab/ds/samples/1.png", "/datasets/lab/ds/resolve/main/README.md",
             "/api/datasets/lab/ds", "/datasets/lab/nope", "/datasets/lab/ds/resolve/main/nope", "/nope"]
    with serving(create_app(root=root)) as url:
        for path in paths:
            for method in ("GET", "HEAD"):
                status, headers, _ = request(url, method, path)
                for name, value in SECURITY_HEADERS.items():
                    assert headers.get(name.lower()) == value, (method, path, status, name)
    assert "default-src 'none'" in SECURITY_HEADERS["Content-Security-Policy"]


@pytest.mark.parametrize("name", ["x.html", "x.svg", "x.htm", "x.xml", "x.txt", "x"])
def test_a_listed_file_a_browser_could_render_is_a_download(root, name):
    add_file(root / "lab/ds", name, f"<svg xmlns='http://www.w3.org/2000/svg'>{SCRIPT}</svg>".encode())
    with serving(create_app(root=root)) as url:
        status, headers, body = request(url, "GET", f"/datasets/lab/ds/resolve/main/{name}")
    assert status == 200 and SCRIPT.encode() in body
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"] == "attachment" and headers["x-content-type-options"] == "nosniff"


def test_a_manifest_symlinked_to_a_private_dataset_shows_nothing_of_it(root, tmp_path):
    edit_manifest(root / "lab/private", lambda d: d["provenance"].update(secret="TOPSECRET-PROVENANCE"))
    (root / "lab/alias").mkdir()
    for f in (root / "lab/ds").iterdir():
        if f.name != "manifest.json":
            os.link(f, root / "lab/alias" / f.name)
    os.symlink("../private/manifest.json", root / "lab/alias/manifest.json")
    with serving(create_app(root=root, tokens=tmp_path / "tokens.yaml")) as url:
        for path in ("/", "/datasets/lab/alias", "/api/datasets/lab/alias", "/datasets/lab/alias/samples/0.png",
                     "/datasets/lab/alias/resolve/main/manifest.json", "/api/datasets/lab/alias/tree/main"):
            status, _, body = request(url, "GET", path)
            assert b"TOPSECRET" not in body, (path, status)
            assert path == "/" or status in (401, 404, 501), (path, status)
        status, _, body = request(url, "GET", "/datasets/lab/private", headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and b"TOPSECRET-PROVENANCE" in body  # under its own name, with its token


def corrupt_index(folder: Path) -> None:
    index = folder / "index.parquet"
    index.write_bytes(b"\0" * index.stat().st_size)


def corrupt_first_image(folder: Path) -> None:
    shard = folder / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[512:600] = b"\xff" * 88  # the first sample's PNG (class 0): not an image any more
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [corrupt_index, corrupt_first_image])
def test_a_damaged_dataset_is_one_log_line_and_no_500(root, caplog, damage):
    damage(root / "lab/ds")
    with caplog.at_level(logging.INFO, logger="dataset_server"), serving(create_app(root=root)) as url:
        for _ in range(5):
            status, _, page = request(url, "GET", "/datasets/lab/ds")
            assert status == 200 and b"Class counts and samples cannot be shown" in page
            for k in (0, 3):
                status, headers, _ = request(url, "GET", f"/datasets/lab/ds/samples/{k}.png")
                assert status == 501 and "cifar5m verify" in headers["x-error-message"]
        assert request(url, "GET", "/")[0] == 200
    logged = [r for r in caplog.records if "lab/ds" in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(logged) == 1 and "\n" not in logged[0].getMessage() and not logged[0].exc_info, logged
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # aiohttp logs a 500 as an error


@pytest.mark.parametrize("name", ["%C2%B2.png", "1" * 5000 + ".png", "%EF%BC%91.png", "-1.png", "01.png.png"])
def test_a_strip_name_that_is_no_class_number_is_a_404(root, name):
    with serving(create_app(root=root)) as url:
        status, headers, _ = request(url, "GET", f"/datasets/lab/ds/samples/{name}")
    assert status == 404 and headers["x-error-code"] == "EntryNotFound"


def test_a_gated_page_shows_no_class_counts_without_its_token(root, tmp_path):
    with serving(create_app(root=root, tokens=tmp_path / "tokens.yaml")) as url:
        status, _, page = request(url, "GET", "/datasets/lab/gated")
        assert status == 200 and b"gated" in page
        assert b"<h2>Classes</h2>" not in page and b"class=bar" not in page
        assert request(url, "GET", "/datasets/lab/gated/resolve/main/index.parquet")[0] == 401
        status, _, page = request(url, "GET", "/datasets/lab/gated", headers={"Authorization": "Bearer g4ted"})
        assert status == 200 and b"<h2>Classes</h2>" in page


def test_if_unmodified_since_follows_rfc_9110(root):
    path = "/datasets/lab/ds/resolve/main/train-000001.tar"
    mtime = (root / "lab/ds/train-000001.tar").stat().st_mtime
    with serving(create_app(root=root)) as url:
        etag = request(url, "HEAD", path)[1]["etag"]
        for date, want in ((formatdate(mtime - 3600, usegmt=True), 412), (formatdate(mtime + 1, usegmt=True), 200),
                           (formatdate(int(mtime), usegmt=True), 200), ("not a date", 200), ("", 200)):
            status, headers, _ = request(url, "GET", path, headers={"If-Unmodified-Since": date})
            assert status == want, (date, status)
        # Without If-Match only: a matching If-Match decides alone (RFC 9110 13.1.4).
        old = formatdate(mtime - 3600, usegmt=True)
        assert request(url, "GET", path, headers={"If-Unmodified-Since": old, "If-Match": etag})[0] == 200
        status, headers, _ = request(url, "GET", path, headers={"If-Unmodified-Since": old, "Range": "bytes=0-9"})
        assert status == 412 and headers["etag"] == etag
