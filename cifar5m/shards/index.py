"""``index.parquet``: one row per sample, the basis of random access.

Columns: ``key``, ``split``, ``shard`` (file name), ``position`` (0-based within the
split), the data offset and size of the image and label members inside the shard
(a member's 512-byte header sits right before its offset), ``label``, and nullable
generator columns: ``confidence`` and ``probs`` (labeler softmax), ``seed`` (the
noise seed of the sample) and ``cond_label`` (class a conditional model was given);
``image_xxh3``, the XXH3-64 digest of the image member's bytes, and ``group_xxh3``, that
of a group of 64 consecutive members (``cifar5m.shards.checksum``), null in indexes written
before they existed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq

from cifar5m.core.errors import ManifestError

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("position", pa.int64(), nullable=False),
        pa.field("image_offset", pa.int64(), nullable=False),
        pa.field("image_size", pa.int32(), nullable=False),
        pa.field("label_offset", pa.int64(), nullable=False),
        pa.field("label_size", pa.int32(), nullable=False),
        pa.field("label", pa.int16(), nullable=False),
        pa.field("confidence", pa.float32()),
        pa.field("seed", pa.int64()),
        pa.field("cond_label", pa.int16()),
        pa.field("probs", pa.list_(pa.float32())),
        pa.field("image_xxh3", pa.uint64()),
        pa.field("group_xxh3", pa.uint64()),
    ]
)
COLUMNS = tuple(SCHEMA.names)
# Columns a row may omit (filled with nulls).
OPTIONAL = ("confidence", "seed", "cond_label", "probs", "image_xxh3", "group_xxh3")


def rows_to_table(columns: dict[str, list]) -> pa.Table:
    """Build an index table from column lists; optional columns may be missing."""
    n = len(columns["key"])
    arrays = []
    for fld in SCHEMA:
        values = columns.get(fld.name)
        if values is None:
            if fld.name not in OPTIONAL:
                raise ValueError(f"index column {fld.name!r} is required")
            values = [None] * n
        arrays.append(pa.array(values, type=fld.type))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def write_table(path: Path, table: pa.Table, *, metadata: dict[str, str] | None = None) -> None:
    """Write one index table (zstd; dictionary-encoded strings keep split/shard cheap)."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    pq.write_table(table, path, compression="zstd", use_dictionary=["split", "shard"])


def read_index(
    path: str | Path | pa.NativeFile, *, columns: list[str] | None = None,
    filesystem: pa.fs.FileSystem | object | None = None, where: str | None = None,
) -> pa.Table:
    """Read the index (or some columns of it). Columns asked for that an older index does
    not have (``image_xxh3``) come back as nulls. An unreadable file is a ManifestError
    naming it (``where``, else ``path``)."""
    try:
        if columns is None:
            return pq.read_table(path, filesystem=filesystem)
        with pq.ParquetFile(path, filesystem=filesystem) as parquet:
            have = set(parquet.schema_arrow.names)
            table = parquet.read(columns=[c for c in columns if c in have])
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ManifestError(
            f"{where or path} is not a readable index ({detail}); the file is damaged: "
            f"re-download the dataset or re-create it (`cifar5m verify` checks every file)") from None
    for name in columns:
        if name not in have:
            table = table.append_column(SCHEMA.field(name), pa.nulls(len(table), SCHEMA.field(name).type))
    return table.select(columns)


def shard_runs(shards: pa.ChunkedArray | pa.Array) -> dict[str, slice]:
    """Row range of each shard in an index whose rows are grouped by shard.

    The writer groups rows by shard (and a split's rows sorted by position are too), so
    one pass over the ``shard`` column replaces one filter of the whole index per shard.
    """
    encoded = pc.dictionary_encode(shards)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    if len(encoded) == 0:
        return {}
    names = encoded.dictionary.to_pylist()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    stops = np.r_[starts[1:], len(codes)]
    runs = {names[codes[a]]: slice(int(a), int(b)) for a, b in zip(starts, stops, strict=True)}
    if len(runs) != len(starts):
        raise ValueError("index rows are not grouped by shard")
    return runs


def fixed_width(strings: pa.Array) -> np.ndarray:
    """A string array as numpy fixed-width bytes (``S<longest>``), without Python objects."""
    strings = strings.cast(pa.large_string())
    n = len(strings)
    offsets = np.frombuffer(strings.buffers()[1], np.int64)[strings.offset : strings.offset + n + 1]
    data = np.frombuffer(strings.buffers()[2] or b"", np.uint8)
    lengths = np.diff(offsets)
    width = max(int(lengths.max()) if n else 1, 1)
    if n and (lengths == width).all():
        return data[offsets[0] : offsets[-1]].copy().view(f"S{width}")
    out = np.zeros((n, width), np.uint8)
    for j in range(width):  # one vectorised pass per byte column (keys are short)
        rows = np.flatnonzero(lengths > j)
        out[rows, j] = data[offsets[rows] + j]
    return out.view(f"S{width}").reshape(n)


def index_batches(data: BinaryIO | pa.NativeFile, *, where: str,
                  columns: Sequence[str], batch_rows: int) -> Iterable[pa.RecordBatch]:
    """``columns`` of the index (those it has), ``batch_rows`` rows at a time (``split`` and
    ``shard`` as dictionaries). A damaged file is one ManifestError naming it."""
    try:
        # One column chunk read at a time, decoded in this thread: pre-buffering whole row groups
        # and decoder threads (each keeping its allocator's pages) cost ~80 MB more peak RSS on a
        # 5M-row index, and no time here.
        parquet = pq.ParquetFile(data, read_dictionary=["split", "shard"], pre_buffer=False)
        have = set(parquet.schema_arrow.names)
        yield from parquet.iter_batches(batch_rows, columns=[c for c in columns if c in have], use_threads=False)
    except (pa.ArrowException, OSError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ManifestError(
            f"{where} is not a readable index ({detail}); the file is damaged: re-download "
            f"the dataset or re-create it (`cifar5m verify` checks every file)") from None


def arrow_numpy(array: pa.Array) -> np.ndarray:
    """A primitive Arrow array without nulls as a numpy view (``to_numpy`` imports pandas,
    ~0.3 s and ~40 MB that nothing else here needs)."""
    if array.null_count:
        raise ValueError(f"{array.type} column has nulls")
    values = np.frombuffer(array.buffers()[1], np.dtype(str(array.type)))
    return values[array.offset : array.offset + len(array)]


def value_codes(column: pa.Array, names: list[str]) -> np.ndarray:
    """Per row, the index of its value in ``names`` (-1: not there)."""
    if not isinstance(column, pa.DictionaryArray):
        column = pc.dictionary_encode(column)
    lookup = {name: i for i, name in enumerate(names)}
    table = np.array([lookup.get(v, -1) for v in column.dictionary.to_pylist()] + [-1], np.int32)
    return table[arrow_numpy(column.indices)]


def class_quotas(size: int, num_classes: int) -> list[int]:
    """Per-class counts of a balanced set of ``size`` (remainder to the lowest class ids)."""
    return [size // num_classes + (1 if c < size % num_classes else 0) for c in range(num_classes)]


def balanced_subset(labels: np.ndarray, n: int, *, seed: int, num_classes: int) -> np.ndarray:
    """Positions of ``n`` samples, as equal per class as the data allows, chosen by ``seed``.

    Deterministic for (labels, n, seed). Classes get ``n // k`` each; the remainder goes
    to the lowest class ids; a class with too few samples gives all it has and the rest
    is taken from the others. Returned positions are sorted.
    """
    labels = np.asarray(labels)
    if n > len(labels):
        raise ValueError(f"asked for {n} samples but the split holds {len(labels)}")
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    want = class_quotas(n, num_classes)
    take = [min(w, len(p)) for w, p in zip(want, pools, strict=True)]
    short = n - sum(take)
    while short > 0:  # hand the shortfall to classes with spare samples, round robin
        for c in range(num_classes):
            if short and take[c] < len(pools[c]):
                take[c] += 1
                short -= 1
    chosen = np.concatenate([p[:t] for p, t in zip(pools, take, strict=True)])
    return np.sort(chosen.astype(np.int64))
