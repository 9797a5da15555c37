"""Plain USTAR tar members, written and parsed by hand.

Python's ``tarfile`` would do, but it costs ~20 us per member to build a TarInfo and
it adds pax headers for some values; shards need exactly one 512-byte header per
member with fixed metadata, so byte-identical output is guaranteed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from cifar5m.shards.format import (
    TAR_BLOCK,
    TAR_GID,
    TAR_GNAME,
    TAR_MODE,
    TAR_MTIME,
    TAR_NAME_MAX,
    TAR_UID,
    TAR_UNAME,
)

END_OF_ARCHIVE = b"\0" * (2 * TAR_BLOCK)


def padded_size(size: int) -> int:
    """Bytes a member's data takes in the archive, rounded up to whole blocks."""
    return (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


def _octal(value: int, width: int) -> bytes:
    # width includes the terminating NUL, as in GNU tar and Python's tarfile.
    return f"{value:0{width - 1}o}".encode("ascii") + b"\0"


def header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file ``name`` of ``size`` bytes."""
    raw_name = name.encode("ascii")
    if len(raw_name) > TAR_NAME_MAX:
        raise ValueError(f"tar member name {name!r} is longer than {TAR_NAME_MAX} bytes")
    if size >= 8**11:
        raise ValueError(f"tar member {name!r} of {size} bytes is too large for USTAR")
    fields = [
        raw_name.ljust(100, b"\0"),
        _octal(TAR_MODE, 8),
        _octal(TAR_UID, 8),
        _octal(TAR_GID, 8),
        _octal(size, 12),
        _octal(TAR_MTIME, 12),
        b" " * 8,  # checksum placeholder: spaces while summing
        b"0",  # regular file
        b"\0" * 100,  # link name
        b"ustar\x0000",
        TAR_UNAME.encode().ljust(32, b"\0"),
        TAR_GNAME.encode().ljust(32, b"\0"),
        _octal(0, 8),  # devmajor
        _octal(0, 8),  # devminor
        b"\0" * 155,  # prefix
    ]
    block = bytearray(b"".join(fields).ljust(TAR_BLOCK, b"\0"))
    checksum = sum(block)
    block[148:156] = f"{checksum:06o}".encode("ascii") + b"\0 "
    return bytes(block)


def member(name: str, data: bytes) -> bytes:
    """A whole member: header, data and zero padding to the block boundary."""
    pad = padded_size(len(data)) - len(data)
    return header(name, len(data)) + data + b"\0" * pad


class Member(NamedTuple):
    name: str
    offset: int  # byte offset of the data (not the header) in the archive
    size: int


def parse_header(block: bytes, *, where: str) -> tuple[str, int] | None:
    """Name and size from one header block; None at the end-of-archive marker.

    Raises ValueError naming ``where`` for anything that is not a valid header.
    """
    if len(block) < TAR_BLOCK:
        raise ValueError(f"{where}: truncated tar header ({len(block)} of {TAR_BLOCK} bytes)")
    if block == b"\0" * TAR_BLOCK:
        return None
    stored = block[148:156].split(b"\0", 1)[0].strip()
    try:
        expected = int(stored or b"0", 8)
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise ValueError(f"{where}: not a tar header (unreadable checksum or size)") from None
    actual = sum(block[:148]) + 8 * 32 + sum(block[156:TAR_BLOCK])
    if expected != actual:
        raise ValueError(f"{where}: tar header checksum mismatch (corrupted shard)")
    name = block[:100].split(b"\0", 1)[0].decode("ascii", "replace")
    prefix = block[345:500].split(b"\0", 1)[0].decode("ascii", "replace")
    return (f"{prefix}/{name}" if prefix else name), size


def iter_members(data: bytes | memoryview, *, where: str) -> Iterator[Member]:
    """Walk an in-memory archive member by member, checking every header.

    ``where`` (a path or URL) is put into every error so a failure names its shard.
    """
    view = memoryview(data)
    pos = 0
    while True:
        parsed = parse_header(bytes(view[pos : pos + TAR_BLOCK]), where=f"{where} at byte {pos}")
        if parsed is None:
            return
        name, size = parsed
        start = pos + TAR_BLOCK
        if start + size > len(view):
            raise ValueError(
                f"{where} at byte {pos}: member {name!r} of {size} bytes runs past the end "
                f"of the file ({len(view)} bytes): the shard is truncated"
            )
        yield Member(name, start, size)
        pos = start + padded_size(size)
