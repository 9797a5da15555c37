"""A real SIGKILL, then the same command again: all three trainers end where an uninterrupted run does.

Each killed run is ``cifar5m <command>`` in a subprocess, as in the ``generate`` SIGKILL test
(Popen, poll, SIGKILL). To make *where* the kill lands deterministic instead of a race with
a tiny model that trains in milliseconds, the subprocess is started through ``PARK``: it
parks the process (sleeps) on the N-th call of one function, and the test SIGKILLs it there.
Nothing is cleaned up: no ``finally`` blocks, no atexit, files half written stay half written.
Three places per trainer:

- ``mid-run``: between two checkpoints, so the steps since the last one are lost;
- ``mid-save``: inside the atomic write of a checkpoint (temp file written, not renamed), so
  the previous checkpoint is the one resumed from and a stray temp file is left behind;
- ``before-output``: after the last checkpoint, before the model / result is written.

The rerun is the same command in this process (CliRunner); the reference is the same
command uninterrupted. On CPU with one thread every trainer claims bit-exact resume, so
weights and metrics are compared exactly (wall-clock fields aside).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cifar5m.cli.main import cli
from cifar5m.train.metrics import read_rows

torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1, --threads 1): same sums
ROOT = Path(__file__).resolve().parents[1]

# argv: module, attribute path, n, match, marker, then the cifar5m arguments. Parks before the
# n-th call of module.attribute whose positional arguments (as text) contain ``match``.
PARK = """
import importlib, sys, time
from pathlib import Path
module, name, nth, match, marker = sys.argv[1:6]
owner = importlib.import_module(module)
*parents, attr = name.split(".")
for parent in parents:
    owner = getattr(owner, parent)
original, calls = getattr(owner, attr), [0]
def parked(*args, **kwargs):
    if match in " ".join(map(str, args)):
        calls[0] += 1
        if calls[0] == int(nth):
            Path(marker).write_text(repr(args))
            while True:
                time.sleep(60)  # the test SIGKILLs this process here
    return original(*args, **kwargs)
setattr(owner, attr, parked)
from cifar5m.cli.main import main
main(sys.argv[6:])
"""


def kill_parked(args: list[str], park: tuple[str, str, int, str], tmp_path: Path) -> None:
    """Run ``cifar5m *args`` until it parks at ``park``, then SIGKILL it."""
    marker, log = tmp_path / "parked.txt", tmp_path / "killed.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:  # a pipe nobody reads could fill up with progress bars
        proc = subprocess.Popen([sys.executable, "-c", PARK, *map(str, park), str(marker), *args],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600  # only guards against a hang (2 loaded CI cores)
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"exited ({proc.returncode}) before parking at {park}: {log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"did not park at {park} in 600 s: {log.read_text()[-3000:]}")
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def kill_then_rerun(args: list[str], kill: tuple[tuple, int], tmp_path: Path, *, output: Path,
                    checkpoint: Path) -> str:
    """SIGKILL ``cifar5m *args`` where ``kill`` parks it, check that ``output`` is not written
    and ``checkpoint`` is at the step ``kill`` names, then run the same command to the end."""
    park, left = kill
    kill_parked(args, park, tmp_path)
    assert not output.exists() and checkpoint_step(checkpoint) == left
    return invoke(args)


def reference(args, data: Path, tmp_path_factory, name: str) -> Path:
    """The output of ``args(data, out)`` run uninterrupted."""
    out = tmp_path_factory.mktemp(name) / name
    invoke(args(data, out))
    return out


def invoke(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result.output


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["step"]


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from cifar5m.shards.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("d") / "ds", n_train=100, n_test=40)


# --- train-labeler: 100 images, batch 32 -> 3 steps an epoch, 9 steps, checkpoints at 2, 4, 6, 8, 9.

def labeler_args(data: Path, out: Path) -> list[str]:
    return ["train-labeler", str(data), "--out", str(out), "--arch", "airbench", "--widths", "8,16,16",
            "--epochs", "3", "--batch-size", "32", "--checkpoint-every", "2", "--max-test", "40",
            "--device", "cpu", "--threads", "1"]


LABELER_KILLS = {  # park, checkpoint step left on disk
    "mid-run": (("cifar5m.generator.training.labeler_recipe", "_Run.train_step", 6, ""), 4),  # step 5 lost
    "mid-save": (("os", "replace", 2, "checkpoint.pt"), 2),  # the save of step 4 cut
    "before-output": (("cifar5m.generator.labeler", "replace_dir", 1, ""), 9),
}


@pytest.fixture(scope="module")
def labeler_reference(data, tmp_path_factory) -> Path:
    return reference(labeler_args, data, tmp_path_factory, "lab")


@pytest.mark.parametrize("where", sorted(LABELER_KILLS))
def test_train_labeler_killed_and_rerun_equals_uninterrupted(data, labeler_reference, tmp_path, where):
    out = tmp_path / "lab"
    kill_then_rerun(labeler_args(data, out), LABELER_KILLS[where], tmp_path, output=out,
                    checkpoint=tmp_path / "lab-work" / "checkpoint.pt")
    ref = labeler_reference
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    got, want = (json.loads((d / "labeler.json").read_text()) for d in (out, ref))
    timing = ("train_seconds", "eval_seconds")
    assert without(got["metrics"], *timing) == without(want["metrics"], *timing)
    assert without(got, "metrics") == without(want, "metrics")
    assert len(got["metrics"]["history"]) == 3  # one entry an epoch, none doubled by the rerun


# --- train-generator: 7 steps of batch 8, checkpoints at 3, 6, 7; a sample grid at step 4.

def generator_args(data: Path, out: Path) -> list[str]:
    return ["train-generator", str(data), "--out", str(out), "--channels", "8,16",
            "--layers-per-block", "1", "--attention-levels", "1", "--norm-groups", "4",
            "--dropout", "0.1", "--batch-size", "8", "--warmup", "2", "--steps", "7",
            "--checkpoint-every", "3", "--sample-every", "4", "--sample-steps", "2",
            "--ema-decay", "0.9", "--timesteps", "50", "--threads", "1"]


GENERATOR_KILLS = {
    "mid-run": (("cifar5m.generator.training.unet", "_Trainer.train_step", 6, ""), 3),  # steps 4, 5 lost
    "mid-save": (("os", "replace", 2, "checkpoint.pt"), 3),  # the save of step 6 cut
    "before-output": (("cifar5m.generator.training.unet", "replace_dir", 1, ""), 7),
}


@pytest.fixture(scope="module")
def generator_reference(data, tmp_path_factory) -> Path:
    return reference(generator_args, data, tmp_path_factory, "gen")


@pytest.mark.parametrize("where", sorted(GENERATOR_KILLS))
def test_train_generator_killed_and_rerun_equals_uninterrupted(data, generator_reference, tmp_path, where):
    out = tmp_path / "gen"
    kill_then_rerun(generator_args(data, out), GENERATOR_KILLS[where], tmp_path, output=out,
                    checkpoint=tmp_path / "gen-work" / "checkpoint.pt")
    ref = generator_reference
    weights = "diffusion_pytorch_model.safetensors"
    assert same_tensors(load_file(str(out / weights)), load_file(str(ref / weights)))
    for name in ("loss_curve.json", "sample_grid.png", "config.json", "scheduler_config.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert without(got, "train_seconds") == without(want, "train_seconds")
    assert len(json.loads((out / "loss_curve.json").read_text())) == 7  # lost steps not doubled
    grid = "samples/step_0000004.png"
    assert (tmp_path / "gen-work" / grid).read_bytes() == (ref.parent / "gen-work" / grid).read_bytes()


# --- train (Deep Bootstrap), real world: N=50 at batch 16 wraps epochs; checkpoints at 3, 6, 8.

def train_args(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--world", "real", "--n", "50", "--arch", "mlp", "--width", "8",
            "--steps", "8", "--batch-size", "16", "--log-every", "2", "--log-dense", "none",
            "--checkpoint-every", "3", "--augment", "crop-flip", "--seed", "1", "--record-keys",
            "--device", "cpu", "--out", str(out)]


TRAIN_KILLS = {
    "mid-run": (("cifar5m.train.trainer", "Learner.step", 6, ""), 3),  # steps 4, 5 lost; row of step 4 logged
    "mid-save": (("os", "replace", 2, "checkpoint.pt"), 3),  # the save of step 6 cut
    "before-output": (("os", "replace", 1, "result.json"), 8),
}


@pytest.fixture(scope="module")
def train_reference(data, tmp_path_factory) -> Path:
    return reference(train_args, data, tmp_path_factory, "run")


def curve(rows: list[dict]) -> list[dict]:
    return [without(r, "images_per_s") for r in rows]


@pytest.mark.parametrize("where", sorted(TRAIN_KILLS))
def test_train_killed_and_rerun_equals_uninterrupted(data, train_reference, tmp_path, where):
    out = tmp_path / "run"
    output = kill_then_rerun(train_args(data, out), TRAIN_KILLS[where], tmp_path, output=out / "result.json",
                             checkpoint=out / "checkpoint.pt")
    assert "finished: step 8" in output
    ref = train_reference
    assert curve(read_rows(out / "metrics.jsonl")) == curve(read_rows(ref / "metrics.jsonl"))
    assert [r["step"] for r in read_rows(out / "metrics.jsonl")] == [0, 2, 4, 6, 8]
    assert (out / "keys-rank0.txt").read_text() == (ref / "keys-rank0.txt").read_text()
    got, want = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (out, ref))
    assert got["step"] == want["step"] == 8
    assert same_tensors(got["model"], want["model"])
    assert got["optimizer"] == want["optimizer"] and got["scheduler"] == want["scheduler"]
    result, expected = (json.loads((d / "result.json").read_text()) for d in (out, ref))
    assert without(result["final"], "images_per_s") == without(expected["final"], "images_per_s")
