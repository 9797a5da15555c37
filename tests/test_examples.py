"""examples/ run as a user runs them: a few CPU steps on a tiny dataset, from a project folder
that holds its own train.py (and generator.py, shards.py, dataset_server.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cifar5m.shards.synthetic import write_synthetic_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's project folder: their own modules named like cifar5m's stages."""
    folder = tmp_path / "project"
    folder.mkdir()
    for name in ("train.py", "generator.py", "shards.py", "dataset_server.py"):
        (folder / name).write_text(f"raise SystemExit('imported the project file {name}')\n")
    return folder


def run(script: Path, args: list[str], cwd: Path) -> list[int]:
    done = subprocess.run([sys.executable, str(script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return [int(m) for m in re.findall(r"^step (\d+)/", done.stdout, flags=re.M)]


@pytest.mark.parametrize("world", ["ideal", "real"])
def test_train_stream_trains_and_resumes_exactly(tmp_path, project, world) -> None:
    data = write_synthetic_dataset(tmp_path / "ds", n_train=256, n_test=16, shard_size=64)
    script = project / "train_stream.py"  # beside the user's train.py, as they would copy it
    shutil.copy(EXAMPLES / "train_stream.py", script)
    args = ["--data", str(data), "--world", world, "--steps", "6", "--batch-size", "32",
            "--save-every", "2", "--out", str(tmp_path / "run")]
    if world == "real":
        args += ["--n", "64"]
    first = run(script, [*args, "--stop-after", "4"], project)
    second = run(script, args, project)
    assert first == [1, 2, 3, 4] and second == [5, 6]  # resumed at the saved stream state
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


@pytest.mark.parametrize(("script", "module", "steps_flag"), [
    ("lightning_datamodule.py", "lightning", "--max-steps"),
    ("accelerate_loop.py", "accelerate", "--steps"),
])
@pytest.mark.parametrize("world", ["ideal", "real"])
def test_framework_examples_train_in_both_worlds(tmp_path, project, script, module, steps_flag, world):
    pytest.importorskip(module)
    data = write_synthetic_dataset(tmp_path / "ds", n_train=256, n_test=16, shard_size=64)
    args = ["--data", str(data), "--world", world, steps_flag, "4", "--batch-size", "32", "--workers", "2"]
    if world == "real":
        args += ["--n", "64"]
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=project, capture_output=True,
                          text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"trained 4 steps in the {world} world" in done.stdout
