"""HTTP ``Range: bytes=...`` parsing (RFC 9110 section 14).

The Hugging Face clients send exactly one range: ``bytes=a-b`` (HfFileSystem random
reads), ``bytes=a-`` (resume after a dropped connection) and nothing else; ``-n``
(the last n bytes) is what parquet readers use for footers. The stream asks for a
scattered subset's samples with several ``a-b`` ranges in one request (``parse_ranges``;
answered ``multipart/byteranges``), up to ``MAX_RANGES`` of them.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# 19 digits: every byte offset below 2**63 fits; longer numbers are not offsets.
_SPEC = re.compile(r"\s*(\d{0,19})\s*-\s*(\d{0,19})\s*")
_FIRST_LAST = re.compile(r"\s*(\d{1,19})\s*-\s*(\d{1,19})\s*")
MAX_RANGES = 2048  # more in one request: the whole file (200) instead
MAX_RANGE_BYTES = 64 << 20  # a multipart body is built in memory


class ByteRange(NamedTuple):
    """Bytes ``start`` (inclusive) to ``end`` (exclusive) of a file of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end - 1}/{self.size}"


class RangeNotSatisfiable(ValueError):
    """The range starts at or past the end of the file (answer 416)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable for a file of {size} bytes")
        self.size = size

    @property
    def content_range(self) -> str:
        return f"bytes */{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range a ``Range`` header asks for, or None to send the whole file.

    Raises RangeNotSatisfiable (416) when the range starts at or past ``size``, or asks
    for the last 0 bytes. Headers that are malformed, not in bytes, or multi-range are
    ignored (None), as RFC 9110 section 14.2 allows.
    """
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = _SPEC.fullmatch(spec)
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        if last and int(last) < start:
            return None  # invalid range-spec: ignore the header
        if start >= size:
            raise RangeNotSatisfiable(size)
        end = min(int(last) + 1, size) if last else size
        return ByteRange(start, end, size)
    if not last:
        return None
    suffix = int(last)
    if suffix == 0 or size == 0:
        raise RangeNotSatisfiable(size)
    return ByteRange(max(size - suffix, 0), size, size)


def parse_ranges(header: str | None, size: int) -> list[ByteRange] | None:
    """The ranges of a multi-range header (``bytes=a-b,c-d,...``, each with both ends), or
    None when it is not one (a single range, or a header to ignore: send the whole file).
    Ranges past the end are left out; RangeNotSatisfiable when none is left."""
    if header is None or "," not in header:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or spec.count(",") >= MAX_RANGES:
        return None
    out = []
    for part in spec.split(","):
        match = _FIRST_LAST.fullmatch(part)
        if match is None or int(match.group(2)) < int(match.group(1)):
            return None
        start = int(match.group(1))
        if start < size:
            out.append(ByteRange(start, min(int(match.group(2)) + 1, size), size))
    if not out:
        raise RangeNotSatisfiable(size)
    return out if sum(r.end - r.start for r in out) <= MAX_RANGE_BYTES else None
