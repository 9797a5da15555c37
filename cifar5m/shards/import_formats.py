"""Readers of existing datasets, for ``cifar5m import``.

Each reader yields ``Item``s in a fixed order; an item decodes its image only when
asked, so resuming an interrupted import skips finished samples without decoding
them. Formats:

- ``cifar5m-npz``: the CIFAR-5m parts (``X`` uint8 (N,32,32,3), ``Y`` labels), local
  or any fsspec URL, read in chunks straight out of the zip (a part is 3 GB
  uncompressed, so it is never loaded whole).
- ``cifar10-jpeg``: ``train/<class>/NNNN.jpg`` and ``test/...`` as a .tar.gz or a
  directory (e.g. a JPEG re-encoded copy of CIFAR-10); classes are interleaved
  (airplane 0000, automobile 0000, ...) so any prefix of the split is balanced.
- ``cifar10-python``: the original ``cifar-10-batches-py`` pickles (directory or .tar.gz).
"""

from __future__ import annotations

import io
import pickle
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import fsspec
import numpy as np
from numpy.lib import format as npformat
from PIL import Image

from cifar5m.core.errors import InvalidSourceError
from cifar5m.shards.format import CIFAR10_CLASSES, IMAGE_BYTES, IMAGE_SHAPE

FORMATS = ("cifar5m-npz", "cifar10-jpeg", "cifar10-python")
NPZ_CHUNK = 4096  # rows per read: 12 MB of pixels, so memory stays flat on 1M-row parts


class Item(NamedTuple):
    split: str
    key: str
    label: int
    load: Callable[[], np.ndarray]  # decodes the (32, 32, 3) uint8 image


def detect_format(source: str) -> str:
    """Guess the format of a source path or URL; InvalidSourceError when unsure."""
    name = source.rstrip("/").rsplit("/", 1)[-1].lower()
    if name.endswith(".npz"):
        return "cifar5m-npz"
    if "cifar-10-batches-py" in name or name in {"cifar-10-python.tar.gz", "data_batch_1"}:
        return "cifar10-python"
    path = Path(source)
    if path.is_dir():
        if (path / "data_batch_1").is_file() or (path / "cifar-10-batches-py").is_dir():
            return "cifar10-python"
        if (path / "train").is_dir():
            return "cifar10-jpeg"
    if name.endswith((".tar.gz", ".tgz", ".tar")) and path.is_file():
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    return "cifar10-jpeg"
                if member.name.endswith("data_batch_1"):
                    return "cifar10-python"
    raise InvalidSourceError(
        f"cannot tell the format of {source}; pass --format ({'|'.join(FORMATS)})"
    )


# --- CIFAR-5m npz parts -------------------------------------------------------------


def part_number(source: str, default: int) -> int:
    """The part number in a CIFAR-5m file name (``cifar5m_part3.npz`` -> 3)."""
    match = re.search(r"part(\d+)", source.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else default


def _npy_header(stream, *, where: str, member: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = npformat.read_magic(stream)
        read = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, fortran, dtype = read(stream)
    except ValueError as exc:
        raise InvalidSourceError(f"{where}: {member} is not a .npy array ({exc})") from None
    if fortran:
        raise InvalidSourceError(f"{where}: {member} is Fortran-ordered; re-save it with np.savez")
    return shape, dtype


def read_npz_labels(zf: zipfile.ZipFile, *, where: str) -> np.ndarray:
    with zf.open("Y.npy") as f:
        y = np.load(f, allow_pickle=False)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise InvalidSourceError(f"{where}: Y must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= len(CIFAR10_CLASSES)):
        raise InvalidSourceError(f"{where}: labels must be in 0..9, found {y.min()}..{y.max()}")
    return y.astype(np.int64)


def iter_npz(
    source: str, *, part: int, split_of: Callable[[int], str | None],
    on_dropped: Callable[[int], object] | None = None,
) -> Iterator[Item]:
    """Items of one CIFAR-5m part; ``split_of(row)`` assigns a split (None drops the row,
    and ``on_dropped(n)`` hears of each chunk's dropped rows, so progress counts them)."""
    with fsspec.open(source, "rb") as raw, _open_zip(raw, source) as zf:
        names = {n.removesuffix(".npy") for n in zf.namelist()}
        if not {"X", "Y"} <= names:
            raise InvalidSourceError(
                f"{source}: expected arrays 'X' (images) and 'Y' (labels), found {sorted(names)}"
            )
        labels = read_npz_labels(zf, where=source)
        with zf.open("X.npy") as xs:
            shape, dtype = _npy_header(xs, where=source, member="X")
            if dtype != np.uint8 or tuple(shape[1:]) != IMAGE_SHAPE:
                raise InvalidSourceError(
                    f"{source}: X has shape {shape} and dtype {dtype}; expected (N, 32, 32, 3) uint8"
                )
            if shape[0] != len(labels):
                raise InvalidSourceError(f"{source}: X has {shape[0]} images but Y {len(labels)} labels")
            yield from _npz_rows(xs, labels, part=part, split_of=split_of, where=source,
                                 on_dropped=on_dropped)


def _open_zip(raw, source: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(raw)
    except zipfile.BadZipFile as exc:
        raise InvalidSourceError(f"{source} is not an npz (zip) file: {exc}") from None


def _npz_rows(xs, labels: np.ndarray, *, part: int, split_of, where: str, on_dropped) -> Iterator[Item]:
    row_bytes = IMAGE_BYTES
    for start in range(0, len(labels), NPZ_CHUNK):
        count = min(NPZ_CHUNK, len(labels) - start)
        data = xs.read(count * row_bytes)
        if len(data) != count * row_bytes:
            raise InvalidSourceError(f"{where}: X ends after {start + len(data) // row_bytes} images")
        chunk = np.frombuffer(data, np.uint8).reshape(count, *IMAGE_SHAPE)
        dropped = 0
        for j in range(count):
            split = split_of(start + j)
            if split is not None:
                yield Item(split, f"p{part}_{start + j:07d}", int(labels[start + j]),
                           lambda c=chunk, j=j: c[j])
            else:
                dropped += 1
        if dropped and on_dropped is not None:
            on_dropped(dropped)


# --- CIFAR-10 JPEG tree ----------------------------------------------------------------


def _decode_jpeg(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            array = np.asarray(img.convert("RGB"))
    except OSError as exc:
        raise InvalidSourceError(f"{where}: not a decodable image ({exc})") from None
    if array.shape != IMAGE_SHAPE:
        raise InvalidSourceError(f"{where}: image is {array.shape[1]}x{array.shape[0]}, not 32x32 RGB")
    return array


def _jpeg_files(source: str) -> dict[str, bytes | Path]:
    """``split/class/name.jpg`` -> bytes (from a tarball) or a Path (from a directory)."""
    path = Path(source)
    pattern = re.compile(r"(?:^|/)(train|test)/([a-z]+)/([^/]+\.(?:jpe?g|png))$")
    files: dict[str, bytes | Path] = {}
    if path.is_dir():
        for f in path.rglob("*"):
            m = pattern.search(f.relative_to(path).as_posix())
            if m:
                files["/".join(m.groups())] = f
        return files
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                m = pattern.search(member.name)
                if m and member.isfile():
                    files["/".join(m.groups())] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidSourceError(f"{source}: unreadable tar archive ({exc})") from None
    return files


def iter_cifar10_jpeg(source: str) -> Iterator[Item]:
    """Items of the JPEG tree, train then test, classes interleaved."""
    files = _jpeg_files(source)
    if not files:
        raise InvalidSourceError(f"{source}: no train/<class>/*.jpg or test/<class>/*.jpg files")
    for split in ("train", "test"):
        per_class = []
        for name in CIFAR10_CLASSES:
            prefix = f"{split}/{name}/"
            per_class.append(sorted(k for k in files if k.startswith(prefix)))
        unknown = {k.split("/")[1] for k in files if k.startswith(split)} - set(CIFAR10_CLASSES)
        if unknown:
            raise InvalidSourceError(f"{source}: unknown class folders {sorted(unknown)} in {split}/")
        for i in range(max((len(c) for c in per_class), default=0)):
            for label, names in enumerate(per_class):
                if i < len(names):
                    yield _jpeg_item(split, label, names[i], files[names[i]], source)


def _jpeg_item(split: str, label: int, name: str, blob: bytes | Path, source: str) -> Item:
    stem = name.rsplit("/", 1)[1].split(".", 1)[0]
    key = f"{split}_{CIFAR10_CLASSES[label]}_{stem}"
    where = f"{source}: {name}"
    if isinstance(blob, Path):
        return Item(split, key, label, lambda: _decode_jpeg(blob.read_bytes(), where))
    return Item(split, key, label, lambda: _decode_jpeg(blob, where))


# --- CIFAR-10 python pickles -----------------------------------------------------------


def _python_batches(source: str) -> dict[str, dict]:
    path = Path(source)
    wanted = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    found: dict[str, dict] = {}
    if path.is_dir():
        base = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        for name in wanted:
            if (base / name).is_file():
                found[name] = pickle.loads((base / name).read_bytes(), encoding="bytes")
    else:
        with tarfile.open(path) as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if name in wanted and member.isfile():
                    found[name] = pickle.loads(tar.extractfile(member).read(), encoding="bytes")
    missing = [n for n in wanted if n not in found]
    if missing:
        raise InvalidSourceError(f"{source}: missing CIFAR-10 batches {missing}")
    return found


def iter_cifar10_python(source: str) -> Iterator[Item]:
    """Items of the original pickled batches in their own order (train, then test)."""
    batches = _python_batches(source)
    counters = {"train": 0, "test": 0}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        split = "test" if name == "test_batch" else "train"
        batch = batches[name]
        try:
            data = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = np.asarray(batch[b"labels"], np.int64)
        except (KeyError, ValueError) as exc:
            raise InvalidSourceError(f"{source}: {name} is not a CIFAR-10 batch ({exc})") from None
        for image, label in zip(data, labels.tolist(), strict=True):
            yield Item(split, f"{split}_{counters[split]:05d}", label, lambda im=image: im)
            counters[split] += 1
