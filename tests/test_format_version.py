"""Format version 2: new datasets carry the checksum columns; a version-1 dataset written by the
previous release still reads; one written before the checksums is refused in one line until
`cifar5m upgrade` adds them, in place and crash-safe."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cifar5m import Dataset, SampleStream, StreamConfig
from cifar5m.cli.main import cli
from cifar5m.core.errors import CorruptShardError, ManifestVersionError
from cifar5m.shards import checksum
from cifar5m.shards.synthetic import synthetic_images, write_synthetic_dataset
from cifar5m.shards.upgrade import upgrade_dataset

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """The previous release's output: version 1 with the digest columns."""
    return Path(shutil.copytree(FIXTURES / "format-v1", tmp_path / "v1"))


@pytest.fixture
def v1_bare(tmp_path: Path) -> Path:
    """Version 1 before the digest columns: same shards, an index without them."""
    root = tmp_path / "v1-bare"
    shutil.copytree(FIXTURES / "format-v1", root)
    for f in (FIXTURES / "format-v1-no-digests").iterdir():
        shutil.copy(f, root / f.name)
    return root


def expected_image(key: str) -> np.ndarray:
    images = synthetic_images(26, seed=3)  # how the fixtures were written
    return images[int(key[1:]) + (20 if key[0] == "v" else 0)]


def shard_hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.tar"))}


def test_new_datasets_are_version_2_with_checksums(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "ds", n_train=10, n_test=3, shard_size=4)
    assert json.loads((root / "manifest.json").read_text())["version"] == 2
    index = pq.read_table(root / "index.parquet")
    assert index[checksum.COLUMN].null_count == 0 and index[checksum.GROUP_COLUMN].null_count == 0


def test_a_version_1_dataset_of_the_previous_release_still_reads(v1: Path) -> None:
    split = Dataset(v1).split("train")
    assert len(split) == 20
    for i in (0, 7, 19):
        sample = split[i]
        assert sample.key == f"t{i:06d}" and sample.label == i % 10
        assert np.array_equal(sample.image, expected_image(sample.key))
    batches = list(SampleStream(StreamConfig(source=str(v1), batch_size=5, return_keys=True)))
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == [f"t{i:06d}" for i in range(20)]
    result = CliRunner().invoke(cli, ["verify", str(v1), "--decode"])
    assert result.exit_code == 0, result.output


def test_a_dataset_without_checksums_is_refused_in_one_line_naming_upgrade(v1_bare: Path) -> None:
    with pytest.raises(ManifestVersionError, match="cifar5m upgrade"):
        Dataset(v1_bare).split("train")
    result = CliRunner().invoke(cli, ["stream", str(v1_bare), "--limit", "1"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and f"cifar5m upgrade {v1_bare}" in lines[0]


def test_upgrade_adds_the_checksums_the_release_would_have_written(v1: Path, v1_bare: Path) -> None:
    shards = shard_hashes(v1_bare)
    result = CliRunner().invoke(cli, ["upgrade", str(v1_bare)])
    assert result.exit_code == 0, result.output
    assert "version 1 -> 2" in result.output
    assert shard_hashes(v1_bare) == shards  # the shards are never touched
    manifest = json.loads((v1_bare / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["provenance"]["upgraded_from_version"] == 1
    got, want = pq.read_table(v1_bare / "index.parquet"), pq.read_table(v1 / "index.parquet")
    for name in (checksum.COLUMN, checksum.GROUP_COLUMN, "key", "label", "image_offset"):
        assert got[name].to_pylist() == want[name].to_pylist(), name
    assert Dataset(v1_bare).split("test").get("v000002").label == 2
    again = CliRunner().invoke(cli, ["upgrade", str(v1_bare)])
    assert again.exit_code == 0 and "already format version 2" in again.output


def test_upgrade_refuses_a_damaged_shard_and_writes_nothing(v1_bare: Path) -> None:
    before = {p.name: p.read_bytes() for p in v1_bare.iterdir()}
    shard = v1_bare / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="train-000001.tar"):
        upgrade_dataset(v1_bare)
    after = {p.name: p.read_bytes() for p in v1_bare.iterdir() if p.name != "train-000001.tar"}
    assert after == {k: v for k, v in before.items() if k != "train-000001.tar"}


def test_an_upgrade_killed_between_index_and_manifest_is_finished_by_a_rerun(v1_bare: Path,
                                                                            monkeypatch) -> None:
    from cifar5m.shards import label_columns

    def crash(root, manifest):
        raise KeyboardInterrupt  # as if killed right after the new index went in

    monkeypatch.setattr(label_columns, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        upgrade_dataset(v1_bare)
    monkeypatch.undo()
    assert json.loads((v1_bare / "manifest.json").read_text())["version"] == 1
    _, manifest = upgrade_dataset(v1_bare)
    assert manifest.version == 2
    result = CliRunner().invoke(cli, ["verify", str(v1_bare), "--decode"])
    assert result.exit_code == 0, result.output
