"""One writer per object-store output: the lease (cifar5m.generator.lease) and the store's writes."""

from __future__ import annotations

import json
import time

import fsspec
import pytest
from click.testing import CliRunner
from generate_helpers import dataset_digest, save_tiny_labeler, save_tiny_unet

from cifar5m.cli.main import cli
from cifar5m.core.errors import LeaseHeldError
from cifar5m.generator import lease as lease_mod
from cifar5m.generator.lease import Lease
from cifar5m.generator.store import Store


@pytest.fixture(autouse=True)
def no_settle(monkeypatch) -> None:
    monkeypatch.setattr(lease_mod, "SETTLE", 0.0)


@pytest.fixture
def where(tmp_path) -> str:
    return f"memory://lease-test/{tmp_path.name}"


def lease_at(where: str, **kw) -> Lease:
    fs, base = fsspec.core.url_to_fs(where)
    return Lease(fs, f"{base}/_work/lease.json", where=where, **kw)


def test_a_live_lease_refuses_a_second_job_and_release_frees_it(where) -> None:
    first, second = lease_at(where), lease_at(where)
    first.acquire()
    try:
        assert first.read()["job_id"] == first.job["job_id"] != second.job["job_id"]
        with pytest.raises(LeaseHeldError, match=rf"^{where} is being written by another job \(job_id "
                                                  rf"{first.job['job_id']}, host .*--break-lease$"):
            second.acquire()
        first.confirm()  # still ours: the refused job wrote nothing
    finally:
        first.release()
    assert first.read() is None
    second.acquire()
    second.release()


def test_a_stale_lease_is_taken_over_and_its_job_stops_before_the_manifest(where) -> None:
    dead = lease_at(where, ttl=0.2)
    dead.acquire()
    dead.stop()  # the job hangs: no more heartbeats
    time.sleep(0.3)
    new = lease_at(where)
    new.acquire()  # expired: free
    try:
        dead.renew()  # the old job wakes up: sees the new owner, stops renewing
        assert dead.lost["job_id"] == new.job["job_id"]
        with pytest.raises(LeaseHeldError, match="this job stopped before writing the manifest"):
            dead.confirm()
        dead.release()  # does not delete someone else's lease
        assert new.read()["job_id"] == new.job["job_id"]
        new.renew()
        new.confirm()
    finally:
        new.release()


def test_break_lease_takes_a_live_lease(where) -> None:
    killed = lease_at(where)
    killed.acquire()
    killed.stop()  # SIGKILLed: its lease stays, fresh, for up to ttl
    taker = lease_at(where)
    taker.acquire(break_lease=True)
    assert taker.read()["job_id"] == taker.job["job_id"]
    with pytest.raises(LeaseHeldError):
        killed.confirm()
    taker.release()


def test_heartbeats_renew_the_lease(where) -> None:
    held = lease_at(where, ttl=0.5)  # a beat every 0.05 s
    held.acquire()
    try:
        first = held.read()["heartbeat"]
        deadline = time.monotonic() + 30
        while held.read()["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert held.read()["heartbeat"] > first
    finally:
        held.release()


def test_store_without_atomic_put_writes_a_temp_object_then_moves_it(where) -> None:
    store = Store(where)
    assert store.atomic  # memory:// puts whole objects
    store.atomic = False  # as for a store whose put can be seen half-written
    store.put("train-000000.tar", b"x" * 10)
    assert store.cat("train-000000.tar") == b"x" * 10
    assert store.sizes() == {"train-000000.tar": 10}
    assert store.sizes("_work/tmp") == {}  # the temp object was moved, not copied


def test_generate_refuses_an_output_leased_by_another_job_until_broken(tmp_path, where) -> None:
    unet, labeler = save_tiny_unet(tmp_path / "unet"), save_tiny_labeler(tmp_path / "labeler")
    other = lease_at(where)
    other.acquire()
    other.stop()  # a job killed outright a moment ago
    args = ["generate", "--out", where, "--model", str(unet), "--labeler", str(labeler), "--count", "20",
            "--test-count", "10", "--shard-size", "10", "--steps", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and result.output.startswith(f"Error: {where} is being written by another job")
    fs, base = fsspec.core.url_to_fs(where)
    assert fs.find(base) == [f"{base}/_work/lease.json"]  # refused before anything was written
    result = CliRunner().invoke(cli, [*args, "--break-lease"])
    assert result.exit_code == 0, result.output
    assert fs.find(base) and not fs.exists(f"{base}/_work")  # finished: parts and lease gone
    local = tmp_path / "local"
    assert CliRunner().invoke(cli, [*args[:2], str(local), *args[3:]]).exit_code == 0
    got = tmp_path / "got"
    got.mkdir()
    for path in fs.find(base):
        (got / path.rsplit("/", 1)[1]).write_bytes(fs.cat_file(path))
    assert dataset_digest(got) == dataset_digest(local)
    assert json.loads((got / "generate_config.json").read_text())["out"] == where
