"""Faults on the read side: a flipped byte never reaches training, damaged files are named.

Each test injects one fault into a tiny dataset and checks the one-line error (type,
file, sample key, byte offset) on every path: local, HTTP, S3, the decoded cache,
``cifar5m stream`` and ``cifar5m grid``; and that datasets without the checksum column
still read (and are checked by sha256).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cifar5m.cli.main import cli
from cifar5m.core.errors import (
    ChecksumMismatchError,
    ManifestError,
    SampleChecksumError,
)
from cifar5m.shards import checksum
from cifar5m.shards.reader import Dataset
from cifar5m.shards.synthetic import write_synthetic_dataset
from cifar5m.shards.verify import verify_dataset
from cifar5m.train.stream import SampleStream, StreamConfig
from tests.test_server_support import serving

KEY = "t000017"  # the sample whose pixels get a flipped byte (in train-000000.tar)


def flip(root: Path, key: str = KEY, *, at: int = 2000) -> tuple[str, int]:
    """Flip one byte ``at`` bytes into ``key``'s image member (past any npy header);
    returns (shard, image offset)."""
    row = pq.read_table(root / "index.parquet").to_pandas().set_index("key").loc[key]
    shard = root / row["shard"]
    data = bytearray(shard.read_bytes())
    data[int(row["image_offset"]) + min(at, int(row["image_size"]) - 1)] ^= 0x5A
    shard.write_bytes(bytes(data))
    return row["shard"], int(row["image_offset"])


def error_line(returncode: int, stderr: str) -> str:
    """The one ``Error:`` line of a failed command (progress bars aside), no traceback."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("Error: ")]
    assert returncode == 1 and len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def stream_all(source: str, **kw) -> list:
    return list(SampleStream(StreamConfig(source=source, batch_size=20, return_keys=True, **kw)))


@pytest.fixture(params=["npy", "png"])
def damaged(request, tmp_path) -> tuple[Path, str, int]:
    root = write_synthetic_dataset(tmp_path / "ds", n_train=60, n_test=10, shard_size=30,
                         image_format=request.param)
    return (root, *flip(root))


def test_a_flipped_byte_is_caught_locally_in_every_read_path(damaged, tmp_path):
    root, shard, offset = damaged
    pattern = rf"{shard} at byte offset {offset} \(sample '{KEY}'\).*cifar5m verify"
    with pytest.raises(SampleChecksumError, match=pattern):
        stream_all(str(root))  # ideal world: the npy gather / PNG per-sample path
    with pytest.raises(SampleChecksumError, match=pattern):
        stream_all(str(root), world="real", n=40)
    with pytest.raises(SampleChecksumError, match=pattern):
        stream_all(str(root), cache_dir=str(tmp_path / "cache"))  # filling the decoded cache
    split = Dataset(root).split("train")
    with pytest.raises(SampleChecksumError, match=pattern):
        split.get(KEY)
    with pytest.raises(SampleChecksumError, match=pattern):
        list(split)
    assert split.get("t000016").key == "t000016"  # its neighbours still read
    with pytest.raises(ChecksumMismatchError, match=rf"{shard} does not match its sha256"):
        verify_dataset(root, progress=False)


def test_a_flipped_byte_is_caught_over_http_and_by_the_stream_command(damaged, static_http):
    root, shard, offset = damaged
    from aiohttp import web

    static = web.Application()
    static.router.add_static("/", str(root))  # Range answered with 206
    pattern = rf"{shard} at byte offset {offset} \(sample '{KEY}'\)"
    with serving(static) as url:
        with pytest.raises(SampleChecksumError, match=pattern):
            stream_all(url)  # Range requests: blocks (npy arena, PNG slices)
        with pytest.raises(SampleChecksumError, match=pattern):
            stream_all(url, block=4, window=64)  # blocks that are not whole groups of 64
        with pytest.raises(SampleChecksumError, match=pattern):
            stream_all(url, world="real", n=40)  # per-sample ranges
    with pytest.raises(SampleChecksumError, match=pattern):
        stream_all(static_http(root))  # a server without Range: whole files
    for fmt in ("stats", "tar"):
        done = subprocess.run([sys.executable, "-m", "cifar5m", "stream", str(root), "--batch-size", "20",
                               "--format", fmt], capture_output=True, timeout=120)
        err = error_line(done.returncode, done.stderr.decode())
        assert f"sample '{KEY}'" in err and f"byte offset {offset}" in err and "cifar5m verify" in err


def test_a_flipped_byte_is_caught_from_s3(tmp_path, moto_s3):
    root = write_synthetic_dataset(tmp_path / "ds", n_train=60, n_test=10, shard_size=30, image_format="npy")
    shard, offset = flip(root)
    url = moto_s3(root, "flipped")
    with pytest.raises(SampleChecksumError, match=rf"{shard} at byte offset {offset} \(sample '{KEY}'\)"):
        stream_all(url, storage_options=moto_s3.options)


def test_a_damaged_decoded_cache_file_is_decoded_again_not_served(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n_train=60, n_test=10, shard_size=30, image_format="npy")
    cache = tmp_path / "cache"
    good = stream_all(str(root), cache_dir=str(cache))
    files = sorted(cache.glob("*.chw.u8"))
    assert len(files) == 2
    data = bytearray(files[0].read_bytes())
    data[5000] ^= 0xFF
    files[0].write_bytes(bytes(data))
    again = stream_all(str(root), cache_dir=str(cache))
    assert [b.keys for b in again] == [b.keys for b in good]
    assert all(np.array_equal(a.images, b.images) for a, b in zip(again, good, strict=True))
    assert files[0].read_bytes() != bytes(data)  # rewritten from the shard


def test_an_index_without_the_checksum_column_is_refused_until_upgraded(tmp_path):
    """Version 2 requires the column (its absence is damage); version 1 written before it is
    refused with the command that adds it, and after `cifar5m upgrade` every read checks it."""
    import hashlib

    from cifar5m.core.errors import ManifestError, ManifestVersionError
    from cifar5m.shards.upgrade import upgrade_dataset

    root = write_synthetic_dataset(tmp_path / "ds", n_train=60, n_test=10, shard_size=30, image_format="npy")
    reference = stream_all(str(root))
    table = pq.read_table(root / "index.parquet")
    pq.write_table(table.drop_columns([checksum.COLUMN]), root / "index.parquet")
    manifest = json.loads((root / "manifest.json").read_text())
    for f in manifest["files"]:
        if f["file"] == "index.parquet":
            f["bytes"] = (root / "index.parquet").stat().st_size
            f["sha256"] = hashlib.sha256((root / "index.parquet").read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="lacks the checksum columns"):
        stream_all(str(root))
    (root / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))  # as an older cifar5m wrote it
    with pytest.raises(ManifestVersionError, match=f"cifar5m upgrade {root}"):
        stream_all(str(root))
    with pytest.raises(ManifestVersionError, match="cifar5m upgrade"):
        Dataset(root).split("train")
    upgrade_dataset(root)
    assert [b.keys for b in stream_all(str(root))] == [b.keys for b in reference]
    assert Dataset(root).split("train").get(KEY).key == KEY
    verify_dataset(root, progress=False)
    flip(root)
    with pytest.raises(SampleChecksumError, match=r"train-000000\.tar"):
        stream_all(str(root))


def test_a_corrupt_index_is_one_named_error(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n_train=40, n_test=10, shard_size=20)
    (root / "index.parquet").write_bytes(np.random.default_rng(0).bytes(5000))
    done = subprocess.run([sys.executable, "-m", "cifar5m", "stream", str(root), "--batch-size", "10"],
                          capture_output=True, text=True, timeout=120)
    assert f"{root}/index.parquet" in error_line(done.returncode, done.stderr)
    result = CliRunner().invoke(cli, ["info", str(root)])
    assert result.exit_code == 1 and "index.parquet is not a readable index" in result.output
    # Without the manifest's checksum (a hand-made copy), pyarrow's failure is named too.
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if f["file"] != "index.parquet"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"index\.parquet is not a readable index"):
        Dataset(root).split("train")


def test_grid_on_a_damaged_shard_names_the_shard_not_a_python_object(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n_train=40, n_test=10, shard_size=20)
    shard = root / "train-000000.tar"
    shard.write_bytes(b"\0" * shard.stat().st_size)  # zeroed: no PNG left in it
    result = CliRunner().invoke(cli, ["grid", str(root), "-o", str(tmp_path / "g.png"), "--per-class", "2"])
    assert result.exit_code == 1 and "train-000000.tar" in result.output, result.output
    assert "<_io" not in result.output and "cifar5m verify" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_stream_state_after_sigkill_loses_at_most_state_every_batches(tmp_path):
    """tar: what was written before a SIGKILL is at most --state-every batches ahead of the
    saved state; stats: the state is saved while running (before, only at the end)."""
    import signal
    import time

    root = write_synthetic_dataset(tmp_path / "ds", n_train=300, n_test=10, shard_size=100, image_format="npy")
    base = [sys.executable, "-m", "cifar5m", "stream", str(root), "--batch-size", "10", "--wrap",
            "--steps", "1000000", "--state-every", "3"]
    state = tmp_path / "tar.json"
    proc = subprocess.Popen([*base, "--format", "tar", "--state", str(state)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    got = proc.stdout.read(40 * 10 * 5120)  # 40 batches; then the writer blocks on the full pipe
    proc.send_signal(signal.SIGKILL)
    got += proc.stdout.read()  # what it had written before it died
    proc.wait()
    delivered = len(got) // 5120 // 10  # whole batches (a sample is 5,120 bytes of tar)
    saved = json.loads(state.read_text())["next_batch"]
    assert delivered >= 40 and saved <= delivered <= saved + 3, (saved, delivered)
    state = tmp_path / "stats.json"
    proc = subprocess.Popen([*base, "--state", str(state)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["next_batch"] >= 3


def test_a_flipped_byte_between_image_members_is_caught_by_its_group(tmp_path):
    """The ideal world checks 64 consecutive members with one digest (group_xxh3), which
    also covers the tar headers and label members between them."""
    root = write_synthetic_dataset(tmp_path / "ds", n_train=60, n_test=10, shard_size=30, image_format="npy")
    row = pq.read_table(root / "index.parquet").to_pandas().set_index("key").loc[KEY]
    shard = root / row["shard"]
    data = bytearray(shard.read_bytes())
    data[int(row["label_offset"]) - 400] ^= 0x01  # inside the .cls member's tar header
    shard.write_bytes(bytes(data))
    with pytest.raises(SampleChecksumError, match=r"train-000000\.tar between byte offsets \d+ and \d+ "
                                                  r"\(samples 't000000' to 't000029'\)"):
        stream_all(str(root))
    assert len(stream_all(str(root), world="real", n=40)) == 2  # images only: their members are intact
