"""Writing a stream as a WebDataset tar to a byte stream (``cifar5m stream --format tar``).

Members are plain USTAR (``cifar5m.shards.ustar``): ``<key>.png`` or ``<key>.npy`` with the
image bytes exactly as stored in the shard (nothing is decoded or re-encoded) followed
by ``<key>.cls``, so ``webdataset.WebDataset("pipe:cifar5m stream ... --format tar")``
groups and decodes them like any shard.
"""

from __future__ import annotations

from typing import BinaryIO

from cifar5m.shards import codec, ustar


class TarStreamWriter:
    """Appends samples to ``out`` one batch per write (few syscalls), then the end marker."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.samples = 0
        self.bytes = 0

    def write_batch(self, keys: list[str], images: list[bytes], labels: list[int], ext: str) -> None:
        chunks = []
        for key, image, label in zip(keys, images, labels, strict=True):
            chunks.append(ustar.member(f"{key}.{ext}", image))
            chunks.append(ustar.member(f"{key}.cls", codec.encode_label(label)))
        data = b"".join(chunks)
        self.out.write(data)
        self.samples += len(keys)
        self.bytes += len(data)

    def close(self) -> None:
        self.out.write(ustar.END_OF_ARCHIVE)
        self.out.flush()
