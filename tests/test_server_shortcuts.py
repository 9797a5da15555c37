"""The per-request shortcuts of the server keep its behaviour.

FileBody reads from the page cache inline (``RWF_NOWAIT``) and falls back to a worker
thread for what is not cached: the bytes sent are the file's whichever path (forced
here, and a mix of both) read them. ``Library.get`` reuses a passed dataset check only
within the age it is given.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from dataset_server import responses
from dataset_server.repo import Library
from dataset_server.responses import FileBody
from tests.test_server_support import build_root

DATA = bytes(range(256)) * 40  # 10,240 bytes


async def _never_disconnects() -> dict:
    await asyncio.sleep(3600)
    return {"type": "http.disconnect"}


def _send_range(path: Path, start: int, end: int) -> tuple[list[dict], bytes]:
    messages: list[dict] = []

    async def send(message: dict) -> None:
        messages.append(message)

    fd = os.open(path, os.O_RDONLY)
    body = FileBody(fd, start, end, status=206, headers={"ETag": '"x"'}, send_body=True)
    asyncio.run(body({"type": "http", "extensions": {}}, _never_disconnects, send))
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by FileBody
    return messages, b"".join(m.get("body", b"") for m in messages[1:])


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "f.bin"
    path.write_bytes(DATA)
    return path


def _preadv_half(fd, buffers, offset, flags):
    """Like a read that finds only the first half of the range in the page cache."""
    (view,) = buffers
    half = len(view) // 2
    view[:half] = os.pread(fd, half, offset)
    return half


def _preadv_eagain(fd, buffers, offset, flags):
    raise OSError(errno.EAGAIN, "not cached")


@pytest.mark.parametrize("mode", ["nowait", "thread", "eagain", "half"])
@pytest.mark.parametrize(("start", "end", "chunk"), [(0, 1, 4096), (5, 4101, 4096), (0, 10_240, 4096),
                                                      (100, 10_000, 1000), (10_239, 10_240, 64)])
def test_range_bytes_are_the_files(data_file, monkeypatch, mode, start, end, chunk):
    monkeypatch.setattr(responses, "CHUNK", chunk)
    if mode == "thread":
        monkeypatch.setattr(responses, "_NOWAIT", None)
    elif mode in ("eagain", "half"):
        monkeypatch.setattr(responses, "_NOWAIT", 1)
        monkeypatch.setattr(responses.os, "preadv", _preadv_eagain if mode == "eagain" else _preadv_half)
    messages, body = _send_range(data_file, start, end)
    assert messages[0]["status"] == 206
    assert body == DATA[start:end]
    assert messages[-1]["more_body"] is False
    assert all(len(m["body"]) <= chunk for m in messages[1:])


@pytest.mark.parametrize("mode", ["nowait", "thread"])
def test_a_file_that_shrank_ends_the_body_short_with_an_error(data_file, monkeypatch, mode):
    if mode == "thread":
        monkeypatch.setattr(responses, "_NOWAIT", None)
    fd = os.open(data_file, os.O_RDONLY)
    os.truncate(data_file, 100)
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    body = FileBody(fd, 0, len(DATA), status=200, headers={}, send_body=True)
    with pytest.raises(OSError, match="file ended at byte 100"):
        asyncio.run(body({"type": "http", "extensions": {}}, _never_disconnects, send))
    assert sum(len(m.get("body", b"")) for m in sent[1:]) < len(DATA)


def test_dataset_checks_are_reused_only_within_max_age(make_dataset, tmp_path):
    root = build_root(make_dataset, tmp_path / "root", n_train=10, n_test=0)
    library = Library(root)
    repo = library.get("lab", "ds", max_age=60.0)
    assert repo is not None
    (root / "lab" / "ds" / "manifest.json").rename(tmp_path / "gone.json")  # no longer finished
    assert library.get("lab", "ds", max_age=60.0) is repo  # file requests: within the scan age
    assert library.get("lab", "ds") is None  # API calls (max_age 0) check again
    assert library.get("lab", "ds", max_age=60.0) is None  # a failed check is not reused
