"""One writer per object-store output: a lease object with a job id and a heartbeat.

Object stores reached through fsspec have no file locks, and their conditional
writes are not exposed the same way by every backend, so one job's claim on an
output prefix is a small JSON object, ``<prefix>/_work/lease.json``: the job id
(random, plus host, pid and the scheduler's job id for people), and the time of
its last heartbeat. The finalising rank (rank 0) holds it:

- **acquire**: a lease renewed less than ``ttl`` seconds ago by another job is
  refused (``LeaseHeldError`` says whose and when it expires). Otherwise the job
  writes its own lease, waits ``SETTLE`` seconds and reads it back: of two jobs
  starting together, the one whose write landed last wins and the other is refused.
- **heartbeat**: a thread re-reads and rewrites the lease every ``ttl / 10``
  seconds; if it finds another job's lease there it stops renewing and the run
  fails before it writes the index or the manifest (``confirm``).
- **release**: deleting ``_work/`` at the end of a finished run drops it; a run
  that fails releases it in ``release``. A job killed outright leaves it behind:
  it expires ``ttl`` seconds after the last heartbeat, or ``--break-lease`` takes
  it over at once (only when that job is known to be dead).

What it guarantees, on a store with read-after-write consistency (S3, GCS, Azure)
and node clocks that agree to well within ``ttl``: while a job heartbeats, a
second job on the same prefix is refused; two jobs started within the settle
window cannot both pass; a job that loses its lease never writes the manifest.
It is not a fence: a stalled job (paused longer than ``ttl``) may still upload a
shard after another took over. Shards are deterministic for a fingerprint and other
fingerprints are refused, so such a late shard has the bytes the new job writes.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from cifar5m.core.errors import LeaseHeldError

LEASE_NAME = "lease.json"
TTL = 300.0  # seconds without a heartbeat after which a lease is free
SETTLE = 1.0  # seconds between writing a lease and reading it back


def new_job() -> dict[str, Any]:
    """Who this job is: a random id, and what a person needs to find the job."""
    env = os.environ
    return {"job_id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job_id": env.get("SLURM_JOB_ID"), "torchrun_id": env.get("TORCHELASTIC_RUN_ID")}


class Lease:
    """This job's lease on ``path`` (an fsspec path on ``fs``)."""

    def __init__(self, fs: Any, path: str, *, where: str, ttl: float = TTL) -> None:
        self.fs, self.path, self.where, self.ttl = fs, path, where, ttl
        self.job = new_job()
        self.lost: dict[str, Any] | None = None  # the other job's lease, once seen
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # torn or foreign bytes: nobody's lease
            return None

    def _write(self) -> None:
        doc = {**self.job, "heartbeat": time.time(), "ttl": self.ttl}
        self.fs.pipe_file(self.path, json.dumps(doc).encode())

    def _refuse(self, other: dict[str, Any], why: str) -> LeaseHeldError:
        age = time.time() - float(other.get("heartbeat", 0))
        who = ", ".join(f"{k} {other[k]}" for k in ("job_id", "host", "pid", "slurm_job_id")
                        if other.get(k) is not None)
        return LeaseHeldError(
            f"{self.where} is being written by another job ({who}; last heartbeat {age:.0f} s ago){why}; "
            f"wait for it, or if that job is dead re-run after its lease expires "
            f"(in {max(0.0, float(other.get('ttl', self.ttl)) - age):.0f} s) or with --break-lease")

    def acquire(self, *, break_lease: bool = False) -> None:
        """Take the lease, or raise ``LeaseHeldError``; then start heartbeating."""
        other = self.read()
        if other is not None and not break_lease and self._live(other):
            raise self._refuse(other, "")
        self._write()
        time.sleep(SETTLE)
        now = self.read()
        if now is None or now.get("job_id") != self.job["job_id"]:
            raise self._refuse(now or {}, " (it started at the same moment as this one)")
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _live(self, doc: dict[str, Any]) -> bool:
        return time.time() - float(doc.get("heartbeat", 0)) < float(doc.get("ttl", self.ttl))

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 10):
            self.renew()

    def renew(self) -> None:
        """One heartbeat: rewrite the lease if it is still ours, else remember who took it."""
        try:
            now = self.read()
            if now is not None and now.get("job_id") != self.job["job_id"]:
                self.lost = now
                self._stop.set()
                return
            self._write()
        except Exception:  # a store hiccup (any backend's error type): the next beat tries
            pass           # again, well within ttl; confirm() re-reads before the manifest

    def confirm(self) -> None:
        """Raise ``LeaseHeldError`` unless the lease is still this job's (before finishing)."""
        if self.lost is None:
            now = self.read()
            if now is None or now.get("job_id") != self.job["job_id"]:
                self.lost = now or {}
        if self.lost is not None:
            raise self._refuse(self.lost, " (it took this job's lease over; this job stopped "
                                          "before writing the manifest)")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def release(self) -> None:
        """Stop heartbeating and delete the lease if it is still ours."""
        self.stop()
        try:
            now = self.read()
            if now is not None and now.get("job_id") == self.job["job_id"]:
                self.fs.rm_file(self.path)
        except OSError:
            pass
