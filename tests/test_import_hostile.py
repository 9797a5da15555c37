"""``cifar5m import`` of archives from elsewhere: no code from a pickle runs, sizes are checked
before bytes are read, a damaged file is one error line naming it."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from cifar5m.core.errors import InvalidSourceError
from cifar5m.shards import codec
from cifar5m.shards.importer import import_dataset, resolve_config
from cifar5m.shards.reader import Dataset
from cifar5m.shards.synthetic import synthetic_images

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def refused(tmp_path: Path, source: Path) -> str:
    """The one-line error an import of ``source`` ends in (nothing of a dataset written)."""
    with pytest.raises(InvalidSourceError) as info:
        import_dataset(tmp_path / "out", resolve_config([str(source)]), progress=False)
    message = str(info.value)
    assert "\n" not in message and str(source) in message, message
    assert not (tmp_path / "out" / "manifest.json").exists()
    return message


def batch(n: int = 3, seed: int = 0) -> dict:
    images = synthetic_images(n, seed=seed).transpose(0, 3, 1, 2).reshape(n, -1)
    return {b"batch_label": b"training batch 1 of 5", b"labels": [(seed + j) % 10 for j in range(n)],
            b"data": images, b"filenames": [b"x_%d.png" % j for j in range(n)]}


def python_tarball(path: Path, pickles: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in pickles.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("protocol", [2, 5])
def test_python_batches_load_through_the_restricted_unpickler(tmp_path, protocol):
    docs = {name: batch(seed=i) for i, name in enumerate(BATCHES)}
    source = python_tarball(tmp_path / "cifar-10-python.tar.gz",
                            {n: pickle.dumps(d, protocol=protocol) for n, d in docs.items()})
    import_dataset(tmp_path / "out", resolve_config([str(source)]), progress=False)
    train = Dataset(tmp_path / "out").split("train")
    assert len(train) == 15 and train[4].label == docs["data_batch_2"][b"labels"][1]
    np.testing.assert_array_equal(train[4].image, docs["data_batch_2"][b"data"][1].reshape(3, 32, 32)
                                  .transpose(1, 2, 0))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    pickles = {name: pickle.dumps(batch(seed=i)) for i, name in enumerate(BATCHES)}
    pickles["data_batch_1"] = pickle.dumps({b"data": Evil(marker), b"labels": []})
    message = refused(tmp_path, python_tarball(tmp_path / "cifar-10-python.tar.gz", pickles))
    assert "data_batch_1 is not a CIFAR-10 batch" in message and "posix.mkdir" in message, message
    assert not marker.exists()


@pytest.mark.parametrize("doc", [{b"data": [1, 2], b"labels": []}, [1, 2, 3],
                                 {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
                                 {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}])
def test_a_batch_of_another_structure_is_one_line(tmp_path, doc):
    pickles = {name: pickle.dumps(batch(seed=i)) for i, name in enumerate(BATCHES)}
    pickles["test_batch"] = pickle.dumps(doc)
    message = refused(tmp_path, python_tarball(tmp_path / "cifar-10-python.tar.gz", pickles))
    assert "test_batch is not a CIFAR-10 batch" in message, message


def test_a_huge_tar_member_is_refused_before_it_is_read(tmp_path, monkeypatch):
    source = tmp_path / "cifar10-jpeg.tar"
    with open(source, "wb") as f:  # a 1 GiB member, sparse on disk
        info = tarfile.TarInfo("train/cat/0000.jpg")
        info.size = 1 << 30
        f.write(info.tobuf())
        f.seek(512 + (1 << 30))
        f.write(b"\0" * 1024)
    opened = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda tar, m: opened.append(m.name) or real(tar, m))
    message = refused(tmp_path, source)
    assert "train/cat/0000.jpg has 1,073,741,824 bytes" in message, message
    assert opened == []


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is ``width`` x ``height`` RGB, with a first bit of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = zlib.compress(b"\0" * 4096)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat))


@pytest.mark.parametrize(("side", "says"), [(6000, "image is 6000x6000, not 32x32 RGB"),
                                            (12000, "image is far larger than 32x32")])
def test_an_image_of_huge_dimensions_is_refused_from_its_header(tmp_path, side, says):
    (tmp_path / "tree/train/cat").mkdir(parents=True)
    (tmp_path / "tree/train/cat/0000.png").write_bytes(png_header(side, side))
    message = refused(tmp_path, tmp_path / "tree")
    assert f"train/cat/0000.png: {says}" in message, message
    # The same PNG as a shard's member (served, verified, read): refused from its header too.
    with pytest.raises(ValueError, match="PNG is 12000x12000, not RGB 32x32"):
        codec.decode_image(png_header(12000, 12000), "png")


def npy(shape: tuple, descr: str = "<i8", data: bytes = b"") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def npz(path: Path, members: dict[str, bytes], *, compress: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def good_x(n: int = 2) -> bytes:
    buf = io.BytesIO()
    np.save(buf, synthetic_images(n, seed=1))
    return buf.getvalue()


def bad_crc(path: Path) -> Path:
    npz(path, {"Y.npy": npy((2,), data=np.arange(2, dtype="<i8").tobytes()), "X.npy": good_x()})
    data = bytearray(path.read_bytes())
    data[data.rindex(b"X.npy") - 400] ^= 0xFF  # a pixel of X inside the zip: its CRC no longer matches
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(("make", "says"), [
    (bad_crc, "damaged zip file"),
    (lambda p: npz(p, {"Y.npy": npy((2 ** 40,)), "X.npy": good_x()}), "says (1099511627776,)"),
    (lambda p: npz(p, {"Y.npy": npy((2,), data=b"\1" * 9), "X.npy": good_x()}), "Y ends after 1 of 2 labels"),
    (lambda p: npz(p, {"Y.npy": npy((1,), "|O", pickle.dumps([os.getcwd()])), "X.npy": good_x()}),
     "holds Python objects"),
    (lambda p: npz(p, {"Y.npy": b"garbage header", "X.npy": good_x()}), "Y is not a .npy array"),
    (lambda p: npz(p, {"Y.npy": npy((2,), data=np.zeros(2, "<i8").tobytes()), "X.npy": good_x()[:-100]}),
     "X ends after 1 images"),
    (lambda p: npz(p, {"Y": b"", "X": b""}), "expected arrays 'X' (images) and 'Y'"),
])
def test_a_malformed_npz_part_is_one_line_naming_it(tmp_path, make, says):
    message = refused(tmp_path, make(tmp_path / "cifar5m_part0.npz"))
    assert says in message, message
