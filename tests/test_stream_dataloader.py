"""SampleStream as a PyTorch IterableDataset: under DataLoader workers, torchdata's
StatefulDataLoader (resumed mid-run, also into another worker count) and DDP ranks it hands out
exactly the planned batches, in the stream's own order, keys checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from cifar5m import SampleStream, StreamConfig
from cifar5m.core.errors import StreamConfigError, StreamStateError
from cifar5m.dataset_server.launcher import free_port
from cifar5m.shards.synthetic import write_synthetic_dataset

stateful = pytest.importorskip("torchdata.stateful_dataloader")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("dl") / "ds", n_train=400, n_test=10,
                                   shard_size=64)


def config(data: Path, world: str, **kw) -> StreamConfig:
    return StreamConfig(source=str(data), world=world, n=96 if world == "real" else None,
                        batch_size=16, steps=20, return_keys=True, **kw)


def keys(batches) -> list[list[str]]:
    return [list(b.keys) for b in batches]


@pytest.mark.parametrize("world", ["ideal", "real"])
@pytest.mark.parametrize(("workers", "persistent", "pin"), [(0, False, False), (1, True, True),
                                                            (2, False, True), (4, True, False)])
def test_a_dataloader_delivers_the_planned_batches_in_order(data, world, workers, persistent, pin):
    want = keys(SampleStream(config(data, world)))
    loader = DataLoader(SampleStream(config(data, world)), batch_size=None, num_workers=workers,
                        persistent_workers=persistent, pin_memory=pin and torch.cuda.is_available())
    got = [(b.step, list(b.keys)) for b in loader]
    assert [k for _, k in got] == want and [s for s, _ in got] == list(range(20))
    flat = [k for batch in want for k in batch]
    if world == "ideal":
        assert len(set(flat)) == len(flat) == 20 * 16  # every sample at most once
    else:
        assert len(set(flat)) == 96  # the fixed subset, reused


@pytest.mark.parametrize("world", ["ideal", "real"])
@pytest.mark.parametrize(("before", "after"), [(0, 0), (2, 2), (2, 3), (3, 1), (0, 2), (1, 0)])
def test_stateful_dataloader_resumes_exactly_also_into_another_worker_count(data, world, before, after):
    want = keys(SampleStream(config(data, world)))
    loader = stateful.StatefulDataLoader(SampleStream(config(data, world)), batch_size=None,
                                         num_workers=before)
    it = iter(loader)
    first = [list(next(it).keys) for _ in range(7)]
    saved = json.loads(json.dumps(loader.state_dict()))  # as written to a checkpoint
    del it, loader
    stream = SampleStream(config(data, world))
    if before == after:  # the loader's own restore: each worker gets its state back
        resumed = stateful.StatefulDataLoader(stream, batch_size=None, num_workers=after)
        resumed.load_state_dict(saved)
    else:  # another worker count: the stream takes the loader's state, a new loader runs it
        stream.load_state_dict(saved)
        assert stream.state_dict()["next_batch"] == 7
        resumed = stateful.StatefulDataLoader(stream, batch_size=None, num_workers=after)
    assert first + keys(resumed) == want  # nothing repeated, nothing lost


def test_a_worker_state_in_another_worker_count_is_one_clear_error(data):
    loader = stateful.StatefulDataLoader(SampleStream(config(data, "ideal")), batch_size=None, num_workers=2)
    it = iter(loader)
    [next(it) for _ in range(5)]
    saved = loader.state_dict()
    del it, loader
    resumed = stateful.StatefulDataLoader(SampleStream(config(data, "ideal")), batch_size=None, num_workers=3)
    # torchdata itself refuses another worker count here (an assert); the stream would say why
    with pytest.raises((AssertionError, StreamStateError)):
        resumed.load_state_dict(saved)
        list(resumed)
    worker_state = saved["_snapshot"]["_worker_snapshots"]["worker_0"]["dataset_state"]
    with pytest.raises(StreamStateError, match="one DataLoader worker's state"):
        SampleStream(config(data, "ideal")).load_state_dict(worker_state)


def to_float(batch):
    """A per-batch transform: float input in [-1, 1], and which process made it."""
    x = batch.images.float().div(127.5).sub(1)
    return {"x": x, "y": batch.labels, "pid": torch.tensor(os.getpid()), "step": batch.step}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_transform_runs_where_the_batch_is_made(data, workers):
    loader = DataLoader(SampleStream(config(data, "ideal"), transform=to_float), batch_size=None,
                        num_workers=workers)
    out = list(loader)
    assert [o["step"] for o in out] == list(range(20))
    assert out[0]["x"].dtype == torch.float32 and -1 <= float(out[0]["x"].min()) <= float(out[0]["x"].max()) <= 1
    pids = {int(o["pid"]) for o in out}
    assert (pids == {os.getpid()}) if workers == 0 else (len(pids) == 2 and os.getpid() not in pids)


def test_stream_workers_and_dataloader_workers_together_are_refused(data):
    loader = DataLoader(SampleStream(config(data, "ideal", num_workers=2)), batch_size=None, num_workers=2)
    with pytest.raises(StreamConfigError, match="not both"):
        list(loader)


RANK_SCRIPT = """
import json, sys, torch.distributed as dist
from torch.utils.data import DataLoader
from cifar5m import SampleStream, StreamConfig
dist.init_process_group("gloo")
stream = SampleStream(StreamConfig(source=sys.argv[1], world=sys.argv[2], n=96 if sys.argv[2] == "real" else None,
                                   batch_size=16, steps=20, return_keys=True))
got = [(b.step, list(b.keys)) for b in DataLoader(stream, batch_size=None, num_workers=2)]
with open(f"{sys.argv[3]}/rank{dist.get_rank()}.json", "w") as f:
    json.dump(got, f)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("world", ["ideal", "real"])
def test_two_ddp_ranks_on_gloo_split_every_batch_exactly(data, tmp_path, world):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
                           str(data), world, str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s for s, _ in ranks[0]] == [s for s, _ in ranks[1]] == list(range(20))  # equal counts
    whole = keys(SampleStream(config(data, world, rank=0, world_size=1)))
    for step in range(20):  # each global batch is rank 0's half then rank 1's
        assert ranks[0][step][1] + ranks[1][step][1] == whole[step]
