"""Encoding and decoding of sample images and labels.

PNG is lossless and what the Hub viewer shows; ``npy`` is raw uint8 HWC with a
fixed 128-byte header, so a whole shard decodes with one numpy gather (no per-sample
Python work), which is what the fast readers rely on.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, UnidentifiedImageError

from cifar5m.shards.format import IMAGE_BYTES, IMAGE_SHAPE

try:  # libspng decodes a CIFAR PNG in ~40% of Pillow's time, same pixels (PNG is lossless)
    from imagecodecs import spng_decode as _spng
except ImportError:  # optional (the `train` extra): Pillow then decodes
    _spng = None

# np.save's header for a (32, 32, 3) uint8 array: version 1.0, padded to 128 bytes.
_NPY_BUF = io.BytesIO()
np.save(_NPY_BUF, np.zeros(IMAGE_SHAPE, np.uint8))
NPY_HEADER = _NPY_BUF.getvalue()[:-IMAGE_BYTES]
NPY_HEADER_SIZE = len(NPY_HEADER)
NPY_SIZE = NPY_HEADER_SIZE + IMAGE_BYTES
del _NPY_BUF
_NPY_HEADER_U8 = np.frombuffer(NPY_HEADER, np.uint8)
_PNG_IHDR = b"IHDR" + struct.pack(">II", 32, 32)  # bytes 12..24 of a 32x32 PNG


def check_image(image: np.ndarray, *, where: str) -> np.ndarray:
    """Return ``image`` as a C-contiguous uint8 (32, 32, 3) array or raise ValueError."""
    array = np.asarray(image)
    if array.shape != IMAGE_SHAPE or array.dtype != np.uint8:
        raise ValueError(
            f"{where}: image has shape {array.shape} and dtype {array.dtype}; "
            f"expected {IMAGE_SHAPE} uint8 (32x32 RGB)"
        )
    return np.ascontiguousarray(array)


def encode_image(image: np.ndarray, image_format: str) -> bytes:
    """Encode a checked (32, 32, 3) uint8 image as PNG or npy bytes."""
    if image_format == "npy":
        return NPY_HEADER + image.tobytes()
    if image_format == "png":
        out = io.BytesIO()
        # compress_level 9 costs ~1.3x the encode time of the default 6 for ~3% fewer
        # bytes on CIFAR images; shards are written once and read many times.
        Image.fromarray(image, "RGB").save(out, format="PNG", compress_level=9)
        return out.getvalue()
    raise ValueError(f"unknown image format {image_format!r}; use 'png' or 'npy'")


def decode_image(data: bytes | memoryview, image_format: str) -> np.ndarray:
    """Decode one image member to a (32, 32, 3) uint8 array; ValueError if it is not one."""
    if image_format == "npy":
        if len(data) != NPY_SIZE or bytes(data[:NPY_HEADER_SIZE]) != NPY_HEADER:
            raise ValueError(f"not a 32x32x3 uint8 .npy member ({len(data)} bytes)")
        return np.frombuffer(data, np.uint8, IMAGE_BYTES, NPY_HEADER_SIZE).reshape(IMAGE_SHAPE)
    ihdr = bytes(data[12:24])
    if ihdr[:4] == b"IHDR" and ihdr != _PNG_IHDR:  # from the header, before any decoder allocates
        raise ValueError("PNG is {}x{}, not RGB 32x32".format(*struct.unpack(">II", ihdr[4:])))
    if _spng is not None:
        try:
            image = _spng(data)
            if image.shape == IMAGE_SHAPE and image.dtype == np.uint8:
                return image
        except Exception:  # Pillow below says what is wrong with it
            pass
    try:
        # formats=["PNG"] skips Pillow's probing of every other format (~2x faster open).
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            if img.mode != "RGB" or img.size != (32, 32):
                raise ValueError(f"PNG is {img.mode} {img.size[0]}x{img.size[1]}, not RGB 32x32")
            return np.asarray(img)
    except UnidentifiedImageError:  # its message names an in-memory <_io.BytesIO object at 0x...>
        raise ValueError(f"not a PNG image ({len(data)} bytes that Pillow cannot identify)") from None
    except (OSError, SyntaxError) as exc:  # Pillow's errors for undecodable data
        raise ValueError(f"undecodable PNG: {exc}") from exc


def npy_headers_ok(buffer: np.ndarray, offsets: np.ndarray) -> bool:
    """Whether the plain npy header of one 32x32x3 uint8 image starts at every offset.

    ``buffer`` is uint8 and the caller has checked that ``offset + NPY_SIZE`` fits for
    each. Members at a constant stride (the writer's layout) are one strided view, about
    5x cheaper than fancy indexing.
    """
    if len(offsets) == 0:
        return True
    heads = _rows_at(buffer, np.asarray(offsets, np.int64), NPY_HEADER_SIZE)
    return np.array_equal(heads, np.broadcast_to(_NPY_HEADER_U8, heads.shape))


def _rows_at(buffer: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """``buffer[s : s + width]`` for every start, as one (len(starts), width) array (the
    caller has checked the bounds). Starts at a constant stride, as the writer lays members
    out, are one strided view; others one fancy index of a sliding window."""
    steps = np.diff(starts)
    if len(starts) == 1 or (steps[0] > 0 and np.all(steps == steps[0])):
        stride = int(steps[0]) if len(starts) > 1 else width
        return np.lib.stride_tricks.as_strided(buffer[int(starts[0]):], (len(starts), width), (stride, 1))
    return np.lib.stride_tricks.as_strided(buffer, (buffer.size - width + 1, width), (1, 1))[starts]


def npy_image_windows(buffer: np.ndarray) -> np.ndarray:
    """A read-only view ``w`` of uint8 ``buffer`` (at least NPY_SIZE bytes) where ``w[o]`` is
    the 3072 image bytes of the npy member starting at offset ``o``: a batch of members
    is then one fancy index, ``w[offsets]``."""
    return np.lib.stride_tricks.as_strided(buffer[NPY_HEADER_SIZE:], (buffer.size - NPY_SIZE + 1, IMAGE_BYTES),
                                           (1, 1), writeable=False)


def decode_npy_batch(buffer: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Gather many npy members out of one shard buffer at once.

    ``buffer`` is the shard's bytes as a uint8 array, ``offsets`` the data offsets of
    the members (from the index); returns (len(offsets), 32, 32, 3) uint8 (a copy).
    Members written by ``cifar5m.shards.writer`` sit at a constant stride, so the common case
    is one strided view and one memcpy-like copy.
    """
    starts = np.asarray(offsets, np.int64) + NPY_HEADER_SIZE
    out_shape = (len(starts), *IMAGE_SHAPE)
    if len(starts) == 0:
        return np.empty(out_shape, np.uint8)
    if starts.min() < 0 or starts.max() + IMAGE_BYTES > buffer.size:
        raise ValueError(f"an npy member runs past the end of the shard ({buffer.size} bytes)")
    return np.ascontiguousarray(_rows_at(buffer, starts, IMAGE_BYTES)).reshape(out_shape)


def encode_label(label: int) -> bytes:
    """The ``.cls`` member: the class index in ASCII, as webdataset writes it."""
    return str(int(label)).encode("ascii")


def decode_label(data: bytes | memoryview) -> int:
    """Parse a ``.cls`` member; ValueError if it is not an ASCII integer."""
    text = bytes(data).decode("ascii").strip()
    if not text.lstrip("-").isdigit():
        raise ValueError(f"label member holds {text[:20]!r}, not an integer")
    return int(text)
