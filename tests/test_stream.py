"""cifar5m.train.stream: exactly-once delivery, equal per-rank counts, elastic resume, real world.

Most examples simulate DataLoader workers by running ``WorkerDataset`` with a patched
worker id and merging the way the DataLoader does (in-order round robin), which is the
exact code path the workers run; two plain tests start real worker processes.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cifar5m.core.errors import (
    CorruptShardError,
    NotEnoughSamplesError,
    StreamConfigError,
    StreamStateError,
)
from cifar5m.shards.catalog import Catalog
from cifar5m.shards.reader import Dataset
from cifar5m.shards.synthetic import synthetic_images, write_synthetic_dataset
from cifar5m.train.batch_producer import WorkerDataset, unpack
from cifar5m.train.order import block_grid, block_order
from cifar5m.train.stream import SampleStream, StreamConfig

_DATASETS: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """``get(n, shard_size, fmt)`` -> a dataset written once per module and reused."""
    base = tmp_path_factory.mktemp("stream")

    def get(n: int, shard_size: int, fmt: str = "npy") -> Path:
        key = (n, shard_size, fmt)
        if key not in _DATASETS or not _DATASETS[key].exists():
            _DATASETS[key] = write_synthetic_dataset(base / f"d{n}_{shard_size}_{fmt}", n_train=n, n_test=3,
                                           shard_size=shard_size, image_format=fmt)
        return _DATASETS[key]

    return get


def worker_view(stream: SampleStream, workers: int, group: int = 1) -> list:
    """Batches as a DataLoader with ``workers`` workers hands them out, without processes:
    each worker's messages (runs of ``group`` batches), merged in-order round robin."""
    if workers == 0:
        return list(stream)
    start = stream.next_batch
    iters = []
    for w in range(workers):
        info = mock.Mock(id=w, num_workers=workers)
        with mock.patch("torch.utils.data.get_worker_info", return_value=info):
            iters.append(list(iter(WorkerDataset(stream._producer(), start, group))))
    out, i = [], 0
    while any(iters):  # in-order round robin, skipping exhausted workers
        if iters[i % workers]:
            out += list(unpack(iters[i % workers].pop(0)))
        i += 1
    stream.next_batch = out[-1].step + 1 if out else start
    return out


def run_ranks(cfg: dict, world_size: int, workers: int, *, state=None, stop=None,
              group: int = 1) -> list[list]:
    """Per rank, the batches one pass delivers (optionally restored, optionally cut at ``stop``)."""
    per_rank = []
    for rank in range(world_size):
        stream = SampleStream(StreamConfig(**cfg, rank=rank, world_size=world_size,
                                           num_workers=workers, return_keys=True))
        if state is not None:
            stream.load_state_dict(state)
        expected_len = len(stream)
        batches = worker_view(stream, workers, group)
        assert len(batches) == expected_len
        per_rank.append(batches[:stop] if stop is not None else batches)
    return per_rank


def global_keys(per_rank: list[list]) -> list[list[str]]:
    """Global batches: rank slices concatenated in rank order, checking steps agree."""
    out = []
    for parts in zip(*per_rank, strict=True):
        assert len({p.step for p in parts}) == 1
        out.append([k for p in parts for k in p.keys])
    return out


@st.composite
def run_shapes(draw):
    """Global batch first, then world sizes among its divisors (up to 8) and a dataset size
    that mostly leaves a few batches (tiny sizes and empty runs are drawn too)."""
    batch = draw(st.integers(1, 24))
    divisors = [d for d in range(1, 9) if batch % d == 0]
    ws, ws2 = draw(st.sampled_from(divisors)), draw(st.sampled_from(divisors))
    n = draw(st.integers(max(1, batch - 2), batch * 14 + 5))
    return batch, ws, ws2, n


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=run_shapes(), shard=st.integers(1, 40), workers=st.integers(0, 4),
       workers2=st.integers(0, 4), seed=st.integers(0, 3), cut=st.floats(0, 1),
       block=st.integers(1, 9), window=st.integers(1, 40), use_steps=st.booleans(),
       groups=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_exactly_once_equal_counts_and_elastic_resume(dataset_dir, shape, shard, workers, workers2,
                                                      seed, cut, block, window, use_steps, groups):
    batch, ws, ws2, n = shape
    root = dataset_dir(n, shard)
    total = n // batch
    steps = max(0, total - 1) if use_steps else None
    cfg = dict(source=str(root), batch_size=batch, seed=seed, steps=steps, block=block, window=window)
    if steps is None and n < batch:  # not even one batch: an error, not an empty run
        with pytest.raises(StreamConfigError, match=f"smaller than the global batch size {batch}"):
            SampleStream(StreamConfig(**cfg))
        return
    total = total if steps is None else steps
    reference = global_keys(run_ranks(cfg, 1, 0))
    assert len(reference) == total
    split_keys = set(Dataset(root).split("train").keys)

    k = int(cut * total)
    first = run_ranks(cfg, ws, workers, stop=k, group=groups[0])
    probe = SampleStream(StreamConfig(**cfg, rank=0, world_size=ws))
    for _ in zip(range(k), probe, strict=False):
        pass
    state = probe.state_dict()
    assert state["next_batch"] == k
    second = run_ranks(cfg, ws2, workers2, state=state, group=groups[1])
    assert {len(r) for r in second} == {total - k}  # every rank the same count
    delivered = global_keys(first) + global_keys(second)
    assert delivered == reference  # same global batches, same order, whatever the split
    flat = [key for b in delivered for key in b]
    assert len(flat) == len(set(flat)) == total * batch  # no key twice
    assert set(flat) <= split_keys


def test_block_order_is_a_seeded_permutation_that_keeps_blocks_within_shards():
    counts = [10, 7, 0, 13]
    a = block_order(counts, seed=3, epoch=0, block=4, window=1)
    assert sorted(a.tolist()) == list(range(30))
    np.testing.assert_array_equal(a, block_order(counts, seed=3, epoch=0, block=4, window=1))
    assert not np.array_equal(a, block_order(counts, seed=3, epoch=1, block=4, window=1))
    # window=1: blocks stay contiguous runs inside one shard
    runs = np.split(a, np.flatnonzero(np.diff(a) != 1) + 1)
    shard_of = np.repeat(np.arange(4), counts)
    assert all(len(set(shard_of[r])) == 1 and len(r) <= 4 for r in runs)


def test_prefetch_thread_keeps_order_stops_early_and_raises_in_place():
    from cifar5m.train.prefetch import prefetched

    assert list(prefetched(lambda i: i * i, range(10), 3)) == [i * i for i in range(10)]
    gen = prefetched(lambda i: i, range(1000), 2)
    assert [next(gen) for _ in range(3)] == [0, 1, 2]
    gen.close()  # stops the thread (joins it)

    def fail(i):
        if i == 4:
            raise ValueError("bad 4")
        return i

    got = []
    with pytest.raises(ValueError, match="bad 4"):
        for x in prefetched(fail, range(10), 2):
            got.append(x)
    assert got == [0, 1, 2, 3]


def test_images_labels_and_keys_match_the_dataset(dataset_dir):
    root = dataset_dir(100, 30, "png")
    images = synthetic_images(103)
    stream = SampleStream(StreamConfig(source=str(root), batch_size=16, return_keys=True, seed=5))
    seen = 0
    for b in stream:
        assert b.images.dtype == torch.uint8 and b.images.shape == (16, 3, 32, 32)
        assert b.labels.dtype == torch.int64
        pos = np.array([int(k[1:]) for k in b.keys])
        np.testing.assert_array_equal(b.images.numpy(), images[pos].transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(b.labels.numpy(), pos % 10)
        seen += 1
    assert seen == 6 and stream.report()["dropped_tail"] == 4


def test_pillow_fallback_decodes_the_same_and_damaged_png_names_the_offset(dataset_dir, tmp_path,
                                                                         monkeypatch):
    import cifar5m.shards.codec

    cfg = dict(batch_size=20, return_keys=True)
    root = str(dataset_dir(100, 30, "png"))
    fast = [b.images for b in SampleStream(StreamConfig(source=root, **cfg))]
    monkeypatch.setattr(cifar5m.shards.codec, "_spng", None)
    slow = [b.images for b in SampleStream(StreamConfig(source=root, **cfg))]
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))
    monkeypatch.undo()
    damaged = write_synthetic_dataset(tmp_path / "bad", n_train=40, n_test=3, shard_size=40, image_format="png")
    row = Dataset(damaged).split("train")
    offset, size = int(row.image_offset[7]), int(row.image_size[7])
    shard = damaged / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[offset + 8 : offset + size] = b"\x00" * (size - 8)  # keep the signature, wreck the chunks
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=rf"train-000000\.tar at byte offset {offset} \(sample 't000007'\)"):
        list(SampleStream(StreamConfig(source=str(damaged), batch_size=40)))


def test_not_enough_samples_names_both_numbers_and_wrap_is_logged(dataset_dir, caplog):
    root = str(dataset_dir(50, 20))
    with pytest.raises(NotEnoughSamplesError, match=r"= 60 fresh samples .* holds 50"):
        SampleStream(StreamConfig(source=root, batch_size=10, steps=6))
    with caplog.at_level(logging.WARNING, "cifar5m.stream"):
        stream = SampleStream(StreamConfig(source=root, batch_size=10, steps=12, wrap=True,
                                           return_keys=True))
    assert "wrap=True" in caplog.text
    keys = [k for b in stream for k in b.keys]
    assert len(keys) == 120 and len(set(keys[:50])) == 50 and len(set(keys[50:100])) == 50
    assert stream.report()["wrapped"] is True


def test_bad_config_and_mismatched_state_raise(dataset_dir):
    root = str(dataset_dir(50, 20))
    with pytest.raises(StreamConfigError, match="multiple of the world size 3"):
        SampleStream(StreamConfig(source=root, batch_size=10, rank=0, world_size=3))
    with pytest.raises(StreamConfigError, match="rank 4"):
        SampleStream(StreamConfig(source=root, batch_size=8, rank=4, world_size=4))
    state = SampleStream(StreamConfig(source=root, batch_size=10)).state_dict()
    with pytest.raises(StreamStateError, match="batch_size=10"):
        SampleStream(StreamConfig(source=root, batch_size=5)).load_state_dict(state)
    with pytest.raises(StreamStateError, match="seed"):
        SampleStream(StreamConfig(source=root, batch_size=10, seed=1)).load_state_dict(state)


def test_rank_and_world_size_come_from_the_environment(dataset_dir, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "5")
    stream = SampleStream(StreamConfig(source=str(dataset_dir(50, 20)), batch_size=10))
    assert (stream.rank, stream.world_size) == (2, 5) and stream.report()["per_rank_batch"] == 2


def test_truncated_shard_names_shard_and_offset(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n_train=60, n_test=3, shard_size=30, image_format="png")
    shard = root / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    stream = SampleStream(StreamConfig(source=str(root), batch_size=60, block=60))
    with pytest.raises(CorruptShardError, match=r"train-000001\.tar is truncated: sample 't0000\d\d' at byte offset \d+"):
        list(stream)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("fmt", ["npy", "png"])
def test_real_dataloader_workers_match_in_process(dataset_dir, fmt):
    root = str(dataset_dir(120, 25, fmt))
    base = dict(source=root, batch_size=8, seed=1, return_keys=True)
    ref = [(b.step, b.keys) for b in SampleStream(StreamConfig(**base))]
    stream = SampleStream(StreamConfig(**base, num_workers=2))
    got = []
    for b in stream:
        got.append((b.step, b.keys))
        if len(got) == 5:
            break
    state = stream.state_dict()
    assert state["next_batch"] == 5
    again = SampleStream(StreamConfig(**base, num_workers=3))
    again.load_state_dict(state)
    got += [(b.step, b.keys) for b in again]
    assert got == ref


def test_decoded_cache_gives_identical_batches_and_respects_the_cap(dataset_dir, tmp_path):
    root = str(dataset_dir(120, 25, "png"))
    base = dict(source=root, batch_size=8, seed=2, return_keys=True)
    ref = [(b.keys, b.images) for b in SampleStream(StreamConfig(**base))]
    for _ in range(2):  # cold, then warm
        got = [(b.keys, b.images) for b in SampleStream(StreamConfig(**base, cache_dir=str(tmp_path / "c")))]
        assert [k for k, _ in got] == [k for k, _ in ref]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, ref, strict=True))
    assert len(list((tmp_path / "c").glob("*.chw.u8"))) == 5
    # two worker processes filling one fresh cache at once (flock: one decoder per shard)
    got = [b.keys for b in SampleStream(StreamConfig(**base, cache_dir=str(tmp_path / "w"), num_workers=2))]
    assert got == [k for k, _ in ref] and len(list((tmp_path / "w").glob("*.chw.u8"))) == 5
    cap = 2 * 25 * 3072
    stream = SampleStream(StreamConfig(**base, cache_dir=str(tmp_path / "small"), cache_bytes=cap))
    got = [b.keys for b in stream]
    assert got == [k for k, _ in ref]
    assert stream.cache.size_bytes() <= cap and stream.cache.evicted > 0


# --- real world ---------------------------------------------------------------------------


def epochs_of(keys: list[str], n: int) -> list[list[str]]:
    return [keys[i : i + n] for i in range(0, len(keys) - n + 1, n)]


def test_real_world_epochs_hold_each_subset_key_once_and_reshuffle(dataset_dir):
    root = str(dataset_dir(120, 25))
    cfg = dict(source=root, world="real", n=30, batch_size=12, steps=20, seed=4, return_keys=True)
    keys = [k for b in SampleStream(StreamConfig(**cfg)) for k in b.keys]
    epochs = epochs_of(keys, 30)
    assert len(epochs) == 8 and all(len(set(e)) == 30 for e in epochs)
    assert len({frozenset(e) for e in epochs}) == 1  # the same fixed subset
    assert len({tuple(e) for e in epochs}) == 8  # a new order every epoch
    assert keys == [k for b in SampleStream(StreamConfig(**cfg)) for k in b.keys]  # same seed
    other = [k for b in SampleStream(StreamConfig(**{**cfg, "seed": 5})) for k in b.keys]
    assert other != keys
    # split across 3 ranks and resumed on 2: the same global sequence
    per_rank = run_ranks({k: v for k, v in cfg.items() if k != "return_keys"}, 3, 0, stop=7)
    probe = SampleStream(StreamConfig(**cfg))
    for _ in zip(range(7), probe, strict=False):
        pass
    rest = run_ranks({k: v for k, v in cfg.items() if k != "return_keys"}, 2, 0, state=probe.state_dict())
    assert [k for b in global_keys(per_rank) + global_keys(rest) for k in b] == keys


def test_real_subset_and_index_batches_agree_with_iteration(dataset_dir, tmp_path):
    root = str(dataset_dir(120, 25, "png"))
    cfg = dict(source=root, world="real", n=40, batch_size=8, steps=12, seed=0, return_keys=True,
               rank=1, world_size=2)
    stream = SampleStream(StreamConfig(**cfg))
    images, labels, keys = stream.real_subset()
    assert images.shape == (40, 3, 32, 32) and labels.shape == (40,) and len(set(keys)) == 40
    assert keys == sorted(keys)
    idx_batches = list(stream.iter_index_batches())
    assert len(idx_batches) == 12 and stream.state_dict()["next_batch"] == 12
    batches = list(SampleStream(StreamConfig(**cfg)))
    for idx, b in zip(idx_batches, batches, strict=True):
        assert idx.dtype == torch.int64 and [keys[i] for i in idx.tolist()] == b.keys
        assert torch.equal(images[idx], b.images) and torch.equal(labels[idx], b.labels)
    cached = SampleStream(StreamConfig(**cfg, cache_dir=str(tmp_path)))
    for _ in range(2):  # the subset is stored decoded once, then mapped
        assert torch.equal(cached.real_subset()[0], images)
        cached._subset_data = None
    with pytest.raises(StreamConfigError):
        SampleStream(StreamConfig(source=root, batch_size=8)).real_subset()


def test_class_balanced_subset_and_one_epoch_default(dataset_dir):
    root = str(dataset_dir(120, 25))
    stream = SampleStream(StreamConfig(source=root, world="real", n=50, batch_size=8,
                                       class_balanced=True, return_keys=True))
    assert Counter(stream.real_subset()[1].tolist()) == {c: 5 for c in range(10)}
    keys = [k for b in stream for k in b.keys]
    assert len(keys) == 48 == len(set(keys)) and stream.report()["dropped_tail"] == 2
    with pytest.raises(NotEnoughSamplesError, match="n=500 .* holds 120"):
        SampleStream(StreamConfig(source=root, world="real", n=500))


def test_config_json_round_trip_and_positions_without_reading(dataset_dir):
    root = dataset_dir(50, 20)
    cfg = StreamConfig(source=root, batch_size=10, seed=2, cache_dir=root / "c",
                       storage_options={"anon": True})
    assert cfg.source == str(root) and StreamConfig.from_json(cfg.to_json()) == cfg
    stream = SampleStream(StreamConfig(source=str(root), batch_size=10, rank=1, world_size=2,
                                       return_keys=True))
    steps = [(b, stream.catalog.key_list(p)) for b, p in stream.iter_positions()]
    assert stream.state_dict()["next_batch"] == 5 and len(stream) == 0
    ref = [(b.step, b.keys) for b in SampleStream(StreamConfig(source=str(root), batch_size=10,
                                                               rank=1, world_size=2, return_keys=True))]
    assert steps == ref
    assert stream.global_positions(0)[5:].tolist() == [int(k[1:]) for k in ref[0][1]]


def test_pin_memory_pins_images_and_labels_when_cuda_is_there(dataset_dir, monkeypatch):
    pinned = []

    def fake_pin(self):  # CPU-only torch cannot pin; count the calls instead
        pinned.append(self.dtype)
        return self.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    root = str(dataset_dir(50, 20))
    assert len(list(SampleStream(StreamConfig(source=root, batch_size=10, pin_memory=True)))) == 5
    assert pinned == [torch.uint8, torch.int64] * 5
    pinned.clear()
    real = SampleStream(StreamConfig(source=root, world="real", n=20, batch_size=10, pin_memory=True))
    assert len(list(real)) == 2 and pinned == [torch.uint8, torch.int64] * 2


def test_a_second_live_iterator_raises_and_closing_the_first_frees_the_stream(dataset_dir):
    root = str(dataset_dir(50, 20))
    stream = SampleStream(StreamConfig(source=root, batch_size=10, return_keys=True))
    first = iter(stream)
    assert next(first).step == 0
    for second in (iter(stream), stream.iter_positions()):
        with pytest.raises(StreamStateError, match="already being iterated"):
            next(second)
    first.close()  # or finish it / drop it: then the next pass goes on from batch 1
    assert [b.step for b in stream] == [1, 2, 3, 4]
    real = SampleStream(StreamConfig(source=root, world="real", n=20, batch_size=10, steps=4))
    it = real.iter_index_batches()
    next(it)
    with pytest.raises(StreamStateError, match="already being iterated"):
        next(iter(real))


def test_positions_without_advance_count_only_batches_marked_delivered(dataset_dir):
    stream = SampleStream(StreamConfig(source=str(dataset_dir(50, 20)), batch_size=10))
    for b, _ in stream.iter_positions(advance=False):
        if b == 2:
            break
        stream.delivered(b)
    assert stream.state_dict()["next_batch"] == 2
    with pytest.raises(StreamStateError, match="next batch is 2"):
        stream.delivered(3)


def test_a_pool_smaller_than_one_batch_is_an_error_not_zero_batches(dataset_dir):
    root = str(dataset_dir(50, 20))
    with pytest.raises(StreamConfigError, match=r"n=30 is smaller than the global batch size 64"):
        SampleStream(StreamConfig(source=root, world="real", n=30, batch_size=64, steps=5))
    with pytest.raises(StreamConfigError, match=r"\(50 samples\) is smaller than the global batch size 64"):
        SampleStream(StreamConfig(source=root, batch_size=64))


def test_cache_removes_lock_files_and_serves_a_read_only_cache(dataset_dir, tmp_path, monkeypatch):
    import errno
    import os

    from cifar5m.train import cache as cache_module

    base = dict(source=str(dataset_dir(50, 20)), batch_size=10, return_keys=True)
    ref = [(b.keys, b.images) for b in SampleStream(StreamConfig(**base, cache_dir=str(tmp_path)))]
    assert list(tmp_path.glob("*.chw.u8")) and not list(tmp_path.glob("*.lock"))

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    class ReadOnlyOs:  # a shared cache owned by someone else (CI runs as root: chmod would not bite)
        utime = open = staticmethod(denied)

        def __getattr__(self, name):
            return getattr(os, name)

    monkeypatch.setattr(cache_module, "os", ReadOnlyOs())
    for cache_dir in (tmp_path, tmp_path / "empty"):  # hits, then misses that cannot be kept
        if cache_dir != tmp_path:
            cache_dir.mkdir()
        got = [(b.keys, b.images) for b in SampleStream(StreamConfig(**base, cache_dir=str(cache_dir)))]
        assert [k for k, _ in got] == [k for k, _ in ref]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, ref, strict=True))
    assert not list((tmp_path / "empty").iterdir())


def test_an_index_whose_shard_rows_are_interleaved_is_refused(tmp_path):
    import pyarrow as pa

    from cifar5m.core.errors import ManifestError
    from cifar5m.shards.index import read_index
    from cifar5m.shards.manifest import load_manifest

    root = write_synthetic_dataset(tmp_path / "ds", n_train=40, n_test=0, shard_size=20)
    table = read_index(root / "index.parquet")
    shard = table["shard"].to_pylist()
    shard[0], shard[39] = shard[39], shard[0]  # position 0 now claims the second shard
    table = table.set_column(table.schema.get_field_index("shard"), "shard", pa.array(shard))
    with pytest.raises(ManifestError, match="index rows are not grouped by shard"):
        Catalog.from_table(table, load_manifest(root), "train", url=str(root))


def test_block_grid_cuts_every_shard_into_runs_of_block_samples():
    counts = [5, 0, 8, 3]
    per_shard, starts, stops = block_grid(counts, block=4)
    assert per_shard.tolist() == [2, 0, 2, 1]
    assert list(zip(starts.tolist(), stops.tolist(), strict=True)) == [(0, 4), (4, 5), (5, 9), (9, 13), (13, 16)]
    # Shards at other positions (a catalog's shard_start): the same cuts, moved.
    _, starts, stops = block_grid([5, 3], block=4, shard_start=[10, 0])
    assert list(zip(starts.tolist(), stops.tolist(), strict=True)) == [(10, 14), (14, 15), (0, 3)]


def test_the_catalog_gives_back_the_arrow_memory_its_load_freed(dataset_dir):
    """The index is decoded through Arrow batch by batch; the pool's allocator keeps the freed
    pages (1.2 GB at 5M samples with the whole-table load) unless asked to give them back."""
    root = dataset_dir(100, 30, "npy")
    pool = mock.Mock(wraps=pa.default_memory_pool())
    with mock.patch("cifar5m.shards.catalog.pa.default_memory_pool", return_value=pool):
        stream = SampleStream(StreamConfig(source=str(root), batch_size=16))
    pool.release_unused.assert_called_once_with()
    assert len(stream.catalog) == 100
