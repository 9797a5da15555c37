"""Format constants of a cifar5m dataset directory, in one place.

A dataset is a directory::

    manifest.json            versioned; per shard: file, split, samples, first key, bytes, sha256
    index.parquet            one row per sample: key, split, shard, member offsets/sizes, label, ...
    README.md                Hugging Face dataset card (YAML front matter)
    train-000000.tar ...     WebDataset shards, plain USTAR headers
    test-000000.tar ...

The writer (``cifar5m.shards.writer``) and the reader (``cifar5m.shards.reader``) mirror each other
around these names; nothing else in the project hard-codes them.
"""

from __future__ import annotations

FORMAT_NAME = "cifar5m-shards"
# Bump on any change a reader of the previous version cannot handle.
FORMAT_VERSION = 2  # 2: the index always has the image_xxh3 and group_xxh3 columns

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.parquet"
CARD_NAME = "README.md"
# Work-in-progress state of an unfinished write (finished shards' index parts); removed
# when the dataset is finalised, so a published dataset never carries it.
WORK_DIR = "_work"

SPLITS = ("train", "test")
SHARD_TEMPLATE = "{split}-{index:06d}.tar"
SHARD_GLOB = "{split}-*.tar"

IMAGE_FORMATS = ("png", "npy")
LABEL_EXT = "cls"

HEIGHT, WIDTH, CHANNELS = 32, 32, 3
IMAGE_SHAPE = (HEIGHT, WIDTH, CHANNELS)
IMAGE_BYTES = HEIGHT * WIDTH * CHANNELS

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

DEFAULT_SHARD_SIZE = 10_000

# Tar: 512-byte blocks; plain USTAR headers with fixed metadata so equal input gives
# byte-identical shards (webdataset's ShardWriter writes a pax header per member,
# about 1 KB more per member).
TAR_BLOCK = 512
TAR_MTIME = 0
TAR_MODE = 0o644
TAR_UID = 0
TAR_GID = 0
TAR_UNAME = ""
TAR_GNAME = ""
TAR_NAME_MAX = 100


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``."""
    return SHARD_TEMPLATE.format(split=split, index=index)


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key, else raise ValueError.

    WebDataset groups members by the basename up to the first dot, so keys carry no
    dot; no slash either, since a key is a file name inside the tar.
    """
    if not key or "." in key or "/" in key or len(key) + 4 > TAR_NAME_MAX or not key.isascii():
        raise ValueError(
            f"invalid sample key {key!r}: keys are non-empty ASCII, at most "
            f"{TAR_NAME_MAX - 4} characters, without '.' or '/'"
        )
    return key
