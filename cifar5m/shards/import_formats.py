"""Readers of existing datasets, for ``cifar5m import``.

Each reader yields ``Item``s in a fixed order; an item decodes its image only when
asked, so resuming an interrupted import skips finished samples without decoding
them. Formats:

- ``cifar5m-npz``: the CIFAR-5m parts (``cifar5m.shards.import_npz``).
- ``cifar10-jpeg``: ``train/<class>/NNNN.jpg`` and ``test/...`` as a .tar.gz or a
  directory (e.g. a JPEG re-encoded copy of CIFAR-10); classes are interleaved
  (airplane 0000, automobile 0000, ...) so any prefix of the split is balanced.
- ``cifar10-python``: the original ``cifar-10-batches-py`` pickles (directory or .tar.gz),
  loaded by an unpickler that builds only what a CIFAR-10 batch holds (dicts, lists, bytes,
  numbers and uint8 arrays): a pickle asking for anything else is refused, never run.

Sizes are checked before bytes are read: an archive member or file over ``MAX_IMAGE_BYTES``
(an image) or ``MAX_BATCH_BYTES`` (a batch) is refused unread, and an image's dimensions
are checked from its header before it is decoded.
"""

from __future__ import annotations

import io
import pickle
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from cifar5m.core.errors import InvalidSourceError
from cifar5m.shards.format import CIFAR10_CLASSES, IMAGE_BYTES, IMAGE_SHAPE

FORMATS = ("cifar5m-npz", "cifar10-jpeg", "cifar10-python")
MAX_IMAGE_BYTES = 1 << 20  # a 32x32 JPEG or PNG is a few KB
MAX_BATCH_BYTES = 64 << 20  # a CIFAR-10 batch is 31 MB
_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
# What pickles of numpy arrays name (numpy 1 and 2, protocols 2 to 5), and nothing else.
_ARRAY_GLOBALS = frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                            ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
                            ("numpy._core.numeric", "_frombuffer")})


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


# --- sizes first ------------------------------------------------------------------------


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, *, limit: int, where: str) -> bytes:
    """The bytes of ``member``, refused unread when it says it has more than ``limit``."""
    if member.size > limit:
        raise InvalidSourceError(f"{where}: {member.name} has {member.size:,} bytes, more than the "
                                 f"{limit:,} such a file can have; is this the right archive?")
    return tar.extractfile(member).read()


def _read_file(path: Path, *, limit: int, where: str) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise InvalidSourceError(f"{where}: {path.name} has {size:,} bytes, more than the {limit:,} "
                                 f"such a file can have; is this the right folder?")
    return path.read_bytes()


# --- CIFAR-10 JPEG tree ----------------------------------------------------------------


def _decode_jpeg(data: bytes, where: str) -> np.ndarray:
    try:
        # Pillow warns of (and past twice that, refuses) huge images when it opens them: an error
        # here, like any size other than 32x32, which is checked before the pixels are decoded.
        with warnings.catch_warnings(action="error", category=Image.DecompressionBombWarning), \
                Image.open(io.BytesIO(data)) as img:
            if img.size != IMAGE_SHAPE[1::-1]:
                raise InvalidSourceError(f"{where}: image is {img.size[0]}x{img.size[1]}, not 32x32 RGB")
            array = np.asarray(img.convert("RGB"))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InvalidSourceError(f"{where}: image is far larger than 32x32 ({exc})") from None
    except (OSError, SyntaxError) as exc:
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
                    files["/".join(m.groups())] = _read_member(tar, member, limit=MAX_IMAGE_BYTES, where=source)
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
        return Item(split, key, label,
                    lambda: _decode_jpeg(_read_file(blob, limit=MAX_IMAGE_BYTES, where=source), where))
    return Item(split, key, label, lambda: _decode_jpeg(blob, where))


# --- CIFAR-10 python pickles -----------------------------------------------------------


class _BatchUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 batch holds: numpy arrays (and their dtypes) besides the
    dicts, lists, bytes, strings and numbers pickle makes itself. Any other global a pickle
    names (``os.system``, ``builtins.eval``, ...) is an error before it is looked up."""

    def __init__(self, data: bytes, *, where: str) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("_codecs", "encode"):  # how Python 3 pickles bytes at protocol 2
            return _latin1
        if (module, name) in _ARRAY_GLOBALS:
            return super().find_class(module, name)
        raise InvalidSourceError(f"{self.where} is not a CIFAR-10 batch: its pickle asks for "
                                 f"{module[:100]}.{name[:100]}, which a batch never holds; refusing to load it")


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"bytes encoded as {encoding!r}")
    return text.encode("latin1")


def _load_batch(data: bytes, *, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The (N, 32, 32, 3) images and N labels of one pickled batch; InvalidSourceError otherwise."""
    try:
        batch = _BatchUnpickler(data, where=where).load()
    except InvalidSourceError:
        raise
    except Exception as exc:  # whatever a damaged pickle raises (it built only data): one line
        raise InvalidSourceError(f"{where} is not a CIFAR-10 batch ({type(exc).__name__}: {str(exc)[:200]})") from None
    images = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2
            and images.shape[1] == IMAGE_BYTES and isinstance(labels, list) and len(labels) == len(images)
            and all(type(v) is int and 0 <= v < len(CIFAR10_CLASSES) for v in labels)):
        raise InvalidSourceError(f"{where} is not a CIFAR-10 batch: expected b'data' uint8 (N, 3072) "
                                 f"and b'labels' N integers in 0..9")
    return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels, np.int64)


def _python_batches(source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    path = Path(source)
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if path.is_dir():
        base = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        for name in _BATCHES:
            if (base / name).is_file():
                data = _read_file(base / name, limit=MAX_BATCH_BYTES, where=source)
                found[name] = _load_batch(data, where=str(base / name))
    else:
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    name = member.name.rsplit("/", 1)[-1]
                    if name in _BATCHES and member.isfile():
                        data = _read_member(tar, member, limit=MAX_BATCH_BYTES, where=source)
                        found[name] = _load_batch(data, where=f"{source}: {member.name}")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InvalidSourceError(f"{source}: unreadable tar archive ({exc})") from None
    missing = [n for n in _BATCHES if n not in found]
    if missing:
        raise InvalidSourceError(f"{source}: missing CIFAR-10 batches {missing}")
    return found


def iter_cifar10_python(source: str) -> Iterator[Item]:
    """Items of the original pickled batches in their own order (train, then test)."""
    batches = _python_batches(source)
    counters = {"train": 0, "test": 0}
    for name in _BATCHES:
        split = "test" if name == "test_batch" else "train"
        images, labels = batches[name]
        for image, label in zip(images, labels.tolist(), strict=True):
            yield Item(split, f"{split}_{counters[split]:05d}", label, lambda im=image: im)
            counters[split] += 1
