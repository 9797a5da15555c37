"""``cifar5m download`` from a server that lies: its manifest names files outside the output,
its bodies run past the manifest's sizes, its dataset is of a newer format."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cifar5m.dataset_server.app import create_app
from cifar5m.shards.format import FORMAT_VERSION
from tests.test_download import cli
from tests.test_server_support import Lying, build_root, serving


@pytest.fixture
def root(make_dataset, tmp_path) -> Path:
    return build_root(make_dataset, tmp_path / "root", ("lab/ds", "lab/new"), n_train=20, n_test=10,
                      shard_size=10)


def error_line(done) -> str:
    """The one line a failed command printed (it printed nothing else)."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


@pytest.mark.parametrize("entry", ["ABS", "../../victim", "../victim", ".cifar5m.lock", "sub/x"])
def test_a_manifest_entry_outside_the_output_is_one_line_and_nothing_is_touched(root, tmp_path, entry):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    name = str(victim) if entry == "ABS" else entry
    doc = json.loads((root / "lab/ds/manifest.json").read_text())
    doc["files"].append({"file": name, "bytes": 5, "sha256": hashlib.sha256(b"other").hexdigest()})
    app = create_app(root=root)
    Lying(app).manifest = json.dumps(doc).encode()
    (tmp_path / "work").mkdir()
    with serving(app) as url:
        done = cli(["lab/ds", "--local-dir", "out"], url, tmp_path / "work")
    line = error_line(done)
    assert repr(name) in line and "manifest.json" in line and "not a plain file name" in line, line
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in (tmp_path / "work/out").iterdir()) == [".cache"]  # staging only


def test_a_symlink_of_the_local_copy_leading_out_is_not_written_through(root, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out/train-000000.tar").symlink_to(victim)
    with serving(create_app(root=root)) as url:
        line = error_line(cli(["lab/ds", "--local-dir", "out"], url, tmp_path))
    assert "'train-000000.tar', a symlink leading out of" in line, line
    assert victim.read_bytes() == b"precious"


def test_a_body_longer_than_the_manifest_says_stops_at_its_size(root, tmp_path):
    app = create_app(root=root)
    lying = Lying(app)
    lying.extra["train-000001.tar"] = 256 << 20  # a server that would fill the disk
    size = (root / "lab/ds/train-000001.tar").stat().st_size
    with serving(app) as url:
        line = error_line(cli(["lab/ds", "--local-dir", "out"], url, tmp_path))
    assert f"train-000001.tar sends more than the {size:,} bytes manifest.json lists" in line, line
    assert lying.sent["train-000001.tar"] < 64 << 20  # the client hung up
    assert max(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file()) <= max(
        p.stat().st_size for p in (root / "lab/ds").iterdir())


def test_a_dataset_of_a_newer_format_is_one_line_saying_to_upgrade(root, tmp_path):
    manifest = root / "lab/new/manifest.json"
    newer = json.dumps({**json.loads(manifest.read_text()), "version": FORMAT_VERSION + 1})
    manifest.write_text(newer)
    with serving(create_app(root=root)) as url:  # a cifar5m server, which cannot read it itself
        line = error_line(cli(["lab/new", "--local-dir", "out"], url, tmp_path))
    assert f"format version {FORMAT_VERSION + 1}" in line and "upgrade cifar5m" in line, line
    assert "re-run" not in line
    app = create_app(root=root)
    Lying(app).manifest = newer.encode()  # a server that serves it as it is (the Hub, a mirror)
    with serving(app) as url:
        line = error_line(cli(["lab/ds", "--local-dir", "out2"], url, tmp_path))
    assert f"{url}/datasets/lab/ds/resolve/main/manifest.json has format version {FORMAT_VERSION + 1}" in line
    assert "upgrade cifar5m" in line and "re-run" not in line
