"""CIFAR-5m npz parts for ``cifar5m import``: ``X`` uint8 (N, 32, 32, 3) images, ``Y`` labels.

Local or any fsspec URL, read in chunks straight out of the zip (a part is 3 GB uncompressed,
so it is never loaded whole). Each array's ``.npy`` header is checked before any of its data
is read: a plain dtype (never Python objects: nothing is unpickled), and a size that the zip
member holds; a damaged zip (a bad CRC, cut short) is one error naming the file.
"""

from __future__ import annotations

import math
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

import fsspec
import numpy as np
from numpy.lib import format as npformat

from cifar5m.core.errors import InvalidSourceError
from cifar5m.shards.format import CIFAR10_CLASSES, IMAGE_BYTES, IMAGE_SHAPE
from cifar5m.shards.import_formats import Item

NPZ_CHUNK = 4096  # rows per read: 12 MB of pixels, so memory stays flat on 1M-row parts


def part_number(source: str, default: int) -> int:
    """The part number in a CIFAR-5m file name (``cifar5m_part3.npz`` -> 3)."""
    match = re.search(r"part(\d+)", source.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else default


def _npy_header(stream: BinaryIO, *, where: str, member: str, size: int) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the ``.npy`` member ``member`` (``size`` bytes in the zip), checked."""
    try:
        version = npformat.read_magic(stream)
        read = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, fortran, dtype = read(stream)
    except (ValueError, TypeError) as exc:
        raise InvalidSourceError(f"{where}: {member} is not a .npy array ({exc})") from None
    if fortran:
        raise InvalidSourceError(f"{where}: {member} is Fortran-ordered; re-save it with np.savez")
    if dtype.hasobject:
        raise InvalidSourceError(f"{where}: {member} holds Python objects ({dtype}); re-save it as numbers")
    need = math.prod(shape) * dtype.itemsize
    if need > size:
        raise InvalidSourceError(f"{where}: {member} says {shape} {dtype} ({need:,} bytes) but the zip "
                                 f"holds {size:,}: the file is cut short or damaged; re-download it")
    return shape, dtype


def read_npz_labels(zf: zipfile.ZipFile, *, where: str) -> np.ndarray:
    with zf.open("Y.npy") as f:
        shape, dtype = _npy_header(f, where=where, member="Y", size=zf.getinfo("Y.npy").file_size)
        if len(shape) != 1 or not np.issubdtype(dtype, np.integer):
            raise InvalidSourceError(f"{where}: Y must be a 1-D integer array, got {dtype} {shape}")
        data = f.read(shape[0] * dtype.itemsize)
    if len(data) != shape[0] * dtype.itemsize:
        raise InvalidSourceError(f"{where}: Y ends after {len(data) // dtype.itemsize} of {shape[0]} labels")
    y = np.frombuffer(data, dtype)
    if len(y) and (y.min() < 0 or y.max() >= len(CIFAR10_CLASSES)):
        raise InvalidSourceError(f"{where}: labels must be in 0..9, found {y.min()}..{y.max()}")
    return y.astype(np.int64)


def iter_npz(
    source: str, *, part: int, split_of: Callable[[int], str | None],
    on_dropped: Callable[[int], object] | None = None,
) -> Iterator[Item]:
    """Items of one CIFAR-5m part; ``split_of(row)`` assigns a split (None drops the row,
    and ``on_dropped(n)`` hears of each chunk's dropped rows, so progress counts them)."""
    try:
        with fsspec.open(source, "rb") as raw, _open_zip(raw, source) as zf:
            yield from _items(zf, source, part=part, split_of=split_of, on_dropped=on_dropped)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # a bad CRC, a member cut short
        raise InvalidSourceError(f"{source} is a damaged zip file ({exc}); re-download it") from None


def _items(zf: zipfile.ZipFile, source: str, **how) -> Iterator[Item]:
    names = set(zf.namelist())
    if not {"X.npy", "Y.npy"} <= names:
        raise InvalidSourceError(
            f"{source}: expected arrays 'X' (images) and 'Y' (labels), found "
            f"{sorted(n.removesuffix('.npy') for n in names)[:20]}")
    labels = read_npz_labels(zf, where=source)
    with zf.open("X.npy") as xs:
        shape, dtype = _npy_header(xs, where=source, member="X", size=zf.getinfo("X.npy").file_size)
        if dtype != np.uint8 or tuple(shape[1:]) != IMAGE_SHAPE:
            raise InvalidSourceError(
                f"{source}: X has shape {shape} and dtype {dtype}; expected (N, 32, 32, 3) uint8"
            )
        if shape[0] != len(labels):
            raise InvalidSourceError(f"{source}: X has {shape[0]} images but Y {len(labels)} labels")
        yield from _npz_rows(xs, labels, where=source, **how)


def _open_zip(raw, source: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(raw)
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
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
