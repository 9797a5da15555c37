"""The Deep Bootstrap sweep: the ideal world and the real world at several N, per model and seed.

``run_bootstrap`` checks every run's sample budget first (no run starts when one would
fail), then trains under ``out``, per model (``out/<model>/``):

* ``ideal-seed{s}``: the ideal world, once per model and seed (it does not depend on N);
* ``real-n{N}-seed{s}``: the real world for every N.

Each is a normal, resumable ``train`` run; a finished one is reused as it is, so adding an
N to the command trains only that N. Then ``cifar5m.train.gap`` writes the gap table and the
curves, and ``cifar5m.train.plots`` the figure in the paper's layout.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from cifar5m.core.atomic import atomic_write_bytes
from cifar5m.core.errors import Cifar5mError, NotEnoughSamplesError
from cifar5m.core.ranks import from_env
from cifar5m.shards.lock import DirectoryLock
from cifar5m.train.config import BootstrapConfig
from cifar5m.train.gap import Report, write_report
from cifar5m.train.trainer import RESULT_NAME, train


@dataclass
class BootstrapResult:
    out: Path
    report: Report
    trained: list[str] = field(default_factory=list)  # run directories trained now (not reused)
    reused: list[str] = field(default_factory=list)

    @property
    def plot(self) -> Path:
        return self.report.plot


@dataclass(frozen=True)
class Budget:
    pool: int  # training samples in the dataset's train split
    wrapped: bool  # the ideal world asks for more than one pass (and --wrap allows it)


def check_budgets(config: BootstrapConfig) -> Budget:
    """Every run's samples, checked before any training: raises one error listing all problems."""
    from cifar5m.shards.catalog import Catalog
    from cifar5m.shards.source import open_source
    from cifar5m.train.stream import SampleStream, StreamConfig

    t = config.template
    source = open_source(t.data, storage_options=t.storage_options)
    # one read of the index for every check: the streams below are given the train catalog
    train, test_catalog = Catalog.load_splits(source, "train", t.test_split)
    pool, test = len(train), len(test_catalog)
    del test_catalog
    need = t.steps * t.batch_size
    problems = []
    if test == 0:
        problems.append(f"the test split {t.test_split!r} of {t.data} is empty; use --test-split")
    if need > pool and not t.wrap:
        problems.append(
            f"the ideal world needs {t.steps} steps x batch {t.batch_size} = {need:,} fresh samples "
            f"but {t.data} holds {pool:,} train samples; use --steps <= {pool // t.batch_size}, a "
            "bigger dataset (cifar5m generate), or --wrap (samples then repeat)")
    for n in config.ns:
        if n > pool:
            problems.append(f"the real world N={n:,} is more than the {pool:,} train samples of {t.data}")
        elif n < t.batch_size:
            problems.append(f"the real world N={n:,} is smaller than the batch size {t.batch_size}")
    if not problems:  # the streams' own checks (class-balanced subsets, ...), one per world and N
        for n in (None, *config.ns):
            try:
                SampleStream(StreamConfig(
                    t.data, world="ideal" if n is None else "real", n=n, batch_size=t.batch_size,
                    steps=t.steps, seed=config.seeds[0], rank=0, world_size=1,
                    class_balanced=t.class_balanced, wrap=t.wrap, storage_options=t.storage_options),
                    catalog=train)
            except Cifar5mError as e:
                problems.append(str(e))
    if problems:
        raise NotEnoughSamplesError("no run started: " + "; ".join(problems))
    return Budget(pool, need > pool)


def run_bootstrap(config: BootstrapConfig, *, out: str | Path, progress: bool = True) -> BootstrapResult:
    """Check budgets, train (or reuse) every run, write the gap table and the figure."""
    out = Path(out)
    budget = check_budgets(config)
    # One bootstrap per directory. Under torchrun each run directory is locked by its
    # rank 0 (cifar5m.train.trainer), which refuses a second job at its first run.
    single = from_env().world == 1
    with DirectoryLock(out, what="written by a bootstrap") if single else contextlib.nullcontext():
        return _run_all(config, out, budget, progress=progress)


def _run_all(config: BootstrapConfig, out: Path, budget: Budget, *, progress: bool) -> BootstrapResult:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "bootstrap.json", config.to_json().encode())
    runs = config.runs()
    trained: list[str] = []
    reused: list[str] = []
    rows: dict[str, list[dict]] = {}
    for i, (name, run) in enumerate(runs, 1):
        done = (out / name / RESULT_NAME).exists()
        if progress and from_env().is_main:  # rank 0 speaks under torchrun
            what = f"{run.arch} {run.world}" + (f" N={run.n:,}" if run.world == "real" else "")
            tqdm.write(f"[{i}/{len(runs)}] {what} seed {run.seed}: {out / name}"
                       + (" (finished, reused)" if done else ""))
        rows[name] = train(run, out=out / name, progress=progress).rows
        (reused if done else trained).append(name)
    return BootstrapResult(out, write_report(config, rows, out=out, wrapped=budget.wrapped,
                                                    pool=budget.pool), trained, reused)
