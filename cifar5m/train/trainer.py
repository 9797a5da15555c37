"""One training function for both worlds of the Deep Bootstrap.

Real world: T SGD steps on N samples reused (epochs). Ideal world: the same T steps
where every batch is fresh. ``train`` is the same code for both; the only place the
world matters is the sample stream (``cifar5m.train.stream``) and, in the real world, the
extra train-soft-error metric on its N samples. Defaults follow the paper's code
(preetum/deep-bootstrap-code, ``inftrain/train.py`` and ``sample_sweep.json``):
batch 128, SGD lr 0.1 without momentum or weight decay, cosine over T = 39,000 steps.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cifar5m.core.atomic import atomic_write_bytes
from cifar5m.core.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cifar5m.core.errors import ConfigMismatchError, OutputLockedError, TrainConfigError
from cifar5m.shards.lock import DirectoryLock
from cifar5m.train.batches import TrainData
from cifar5m.train.config import TrainConfig
from cifar5m.train.device_augment import DeviceAugment, prepare
from cifar5m.train.distributed import Runtime
from cifar5m.train.evaluation import Evaluator
from cifar5m.train.metrics import MetricsLog, log_points, read_rows
from cifar5m.train.models import build_model, count_parameters

CONFIG_NAME, RESULT_NAME = "config.json", "result.json"
@dataclass
class TrainResult:
    out: Path
    config: TrainConfig
    rows: list[dict]
    step: int  # steps done (== config.steps when finished)
    finished: bool


def lr_factor(step: int, *, steps: int, schedule: str, every: int = 1) -> float:
    """Cosine from 1 towards 0 over ``steps``, changed every ``every`` batches.

    ``every=1`` is a per-step cosine. The paper's code steps ``CosineAnnealingLR`` with
    ``T_max = steps // every`` after every ``every`` (390) batches: batch ``t`` runs at level
    ``t // every``, so with ``steps <= every`` (T = 390) the rate is constant.
    """
    if schedule != "cosine":
        return 1.0
    levels = max(1, steps // every)
    return 0.5 * (1 + math.cos(math.pi * (step // every) / levels))


@dataclass
class Learner:
    """Model, optimizer, schedule and augmentation; ``step`` is one SGD step on a device batch."""

    config: TrainConfig
    rt: Runtime
    core: nn.Module  # the plain model (its state_dict is what checkpoints hold)
    model: nn.Module  # core, wrapped in DDP and/or torch.compile
    eval_model: nn.Module  # core (compiled): evaluation runs per rank, outside DDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    augment: DeviceAugment

    @classmethod
    def build(cls, config: TrainConfig, rt: Runtime) -> Learner:
        torch.manual_seed(config.seed)  # same initial weights in both worlds for a given seed
        core = build_model(config.arch, width=config.width).to(rt.device)
        if config.channels_last:
            core = core.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(core.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, steps=config.steps, schedule=config.schedule,
                                           every=config.lr_step_every))
        augment = DeviceAugment(config.augment, seed=config.seed * 1000 + rt.rank, device=rt.device)
        return cls(config, rt, core, rt.wrap(core, compile=config.compile),
                   torch.compile(core) if config.compile else core, optimizer, scheduler, augment)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One SGD step on uint8 images already on the device; returns the (lazy) loss."""
        self.model.train()
        x = prepare(self.augment(images), channels_last=self.config.channels_last)
        with self.rt.autocast(self.config.precision):
            logits = self.model(x)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    @property
    def lr(self) -> float:
        """The learning rate of the next step: the optimizer's (its scheduler is the one source
        of the schedule), which is what the metrics rows log."""
        return self.optimizer.param_groups[0]["lr"]


def train(config: TrainConfig, *, out: str | Path, progress: bool = True) -> TrainResult:
    """Train one model in one world; resumes from ``out/checkpoint.pt`` when present."""
    out = Path(out)
    rt = Runtime.start(device=config.device)
    try:
        return _train(config, out, rt, progress=progress)
    finally:
        rt.stop()


def _train(config: TrainConfig, out: Path, rt: Runtime, *, progress: bool) -> TrainResult:
    lock = _lock_out(out, rt)  # one job per run directory; a failed start leaves nothing
    try:
        finished = _check_out(config, out)
        if finished is not None:
            return finished
        # Everything a wrong flag can break (data, split, N, the ideal world's sample budget,
        # the model) is opened before the run directory is written: a failed start leaves
        # nothing behind that would refuse the corrected command.
        data = TrainData.open(config, rt, keys_path=out / f"keys-rank{rt.rank}.txt")
        try:
            evaluator = Evaluator.build(config, rt, data)
            learner = Learner.build(config, rt)
            _write_config(config, out, rt)
            if rt.rank == 0 and progress:
                _note_if_long_on_cpu(config, rt.device)
            return _run(out, rt, learner, data, evaluator, progress=progress)
        finally:
            data.close()
    finally:
        lock.release()


def _note_if_long_on_cpu(config: TrainConfig, device: torch.device) -> None:
    """One line when the defaults (a ResNet for 39,000 steps) meet a CPU: days of work on a
    small machine, and the first progress shows only after the step-0 evaluation."""
    if device.type == "cpu" and not config.arch.startswith("mlp") and config.steps > 2000:
        from tqdm.auto import tqdm

        tqdm.write(f"note: {config.arch} for {config.steps:,} steps on the CPU takes days; for a "
                   f"look in minutes: --arch mlp --steps 390 (what `make demo` runs)")


def _lock_out(out: Path, rt: Runtime) -> DirectoryLock:
    """Rank 0 locks the run directory for the whole run (one job per directory); every
    rank learns whether it could, so all stop together when another job holds it."""
    lock = DirectoryLock(out, what="written by a training run")
    problem = None
    if rt.rank == 0:
        try:
            lock.acquire()
        except OutputLockedError as exc:
            problem = exc
    answers = rt.gather(None if problem is None else str(problem))
    if problem is not None:
        raise problem
    if answers[0] is not None:
        raise OutputLockedError(answers[0])
    return lock


def _run(out: Path, rt: Runtime, learner: Learner, data: TrainData, evaluator: Evaluator, *,
         progress: bool) -> TrainResult:
    """The training loop: resume, then SGD steps with a metrics row at each log point and a
    checkpoint every ``checkpoint_every`` steps."""
    config = learner.config
    log = MetricsLog(out) if rt.rank == 0 else None
    step = _resume(out, rt, learner, data, log)
    data.resume_keys(step)
    points = set(log_points(config.steps, every=config.log_every, dense=config.log_dense))
    if step == 0:
        _log(log, evaluator, learner, step=0, loss=None, clock=(0.0, 0))
    stop = min(config.steps, config.stop_after or config.steps)
    bar = rt.progress(total=config.steps, initial=step, unit_scale=config.batch_size,
                      enabled=progress)
    since, start = step, time.perf_counter()
    while step < stop:
        saves = (step + 1) % config.checkpoint_every == 0 or step + 1 == stop
        images, labels = data.next_batch(copy_next=not saves)
        loss = learner.step(images, labels)
        step += 1
        bar.update(config.batch_size)
        if step in points:
            rt.sync()  # the clock covers the steps since the last row, not the evaluation
            clock = (time.perf_counter() - start, (step - since) * config.batch_size)
            _log(log, evaluator, learner, step=step, loss=loss, clock=clock)
            since, start = step, time.perf_counter()
        if step % config.checkpoint_every == 0 or step == stop:
            _save(out, rt, learner, data, step=step)
    bar.close()
    done = step == config.steps
    if done and rt.rank == 0:
        final = log.rows[-1] if log.rows else {}
        atomic_write_bytes(out / RESULT_NAME, json.dumps(
            {"step": step, "final": final, "parameters": count_parameters(learner.core),
             "wrapped": data.wrapped()}, indent=2).encode())
    rows = log.rows if log is not None else []
    return TrainResult(out, config, rows, step, done)


def _check_out(config: TrainConfig, out: Path) -> TrainResult | None:
    """Check a previous config in ``out`` (reading only). A finished run is returned as is;
    one with other settings is refused once it has a checkpoint or metrics (before that,
    nothing of it is lost: the new settings replace it)."""
    path = out / CONFIG_NAME
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"--out {out} is a file; pass a directory")
    if not path.exists():
        return None
    try:
        old = TrainConfig.from_json(path.read_text())
    except (ValueError, TypeError, TrainConfigError) as exc:
        if started(out):
            raise ConfigMismatchError(f"{path} cannot be read ({exc}); use another --out") from None
        return None
    if old.curve_fields() != config.curve_fields():
        if not started(out):
            return None
        diff = {k: (v, config.curve_fields()[k]) for k, v in old.curve_fields().items()
                if config.curve_fields()[k] != v}
        raise ConfigMismatchError(
            f"{out} holds a run with other settings {diff} (old, new) and its checkpoint or "
            "metrics; use another --out or delete it")
    if (out / RESULT_NAME).exists():
        return TrainResult(out, config, read_rows(out / "metrics.jsonl"), config.steps, True)
    return None


def started(out: Path) -> bool:
    """Whether a run directory holds a checkpoint or a metrics row (work that settings protect)."""
    if (out / CHECKPOINT_NAME).exists() or (out / RESULT_NAME).exists():
        return True
    metrics = out / "metrics.jsonl"
    return metrics.is_file() and bool(metrics.read_text().strip())


def _write_config(config: TrainConfig, out: Path, rt: Runtime) -> None:
    if rt.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / CONFIG_NAME, config.to_json().encode())
    rt.barrier()


def _resume(out: Path, rt: Runtime, learner: Learner, data: TrainData, log: MetricsLog | None) -> int:
    """Load ``out``'s checkpoint into the model, optimizer, stream and RNGs; the step to go on
    from (0 without a checkpoint)."""
    state = load_checkpoint(out)
    if state is None:
        if log is not None:
            log.resume(-1)
        return 0
    if len(state["ranks"]) != rt.world_size:
        raise ConfigMismatchError(
            f"{out}/checkpoint.pt was written by {len(state['ranks'])} processes, this run has "
            f"{rt.world_size}; resume with the same number of processes")
    learner.core.load_state_dict(state["model"])
    learner.optimizer.load_state_dict(state["optimizer"])
    learner.scheduler.load_state_dict(state["scheduler"])
    mine = state["ranks"][rt.rank]
    data.load_state_dict(mine["data"])
    learner.augment.load_state_dict(mine["augment"])
    set_rng_state(mine["rng"])
    if log is not None:
        log.resume(state["step"])
    return state["step"]


def _save(out: Path, rt: Runtime, learner: Learner, data: TrainData, *, step: int) -> None:
    """Checkpoint after ``step`` steps: the model and optimizer once, each rank's stream,
    augmentation and RNG state; rank 0 writes it."""
    mine = {"data": data.state_dict(), "augment": learner.augment.state_dict(), "rng": rng_state()}
    ranks = rt.gather(mine)
    if rt.rank == 0:
        save_checkpoint(out, {"step": step, "model": learner.core.state_dict(),
                              "optimizer": learner.optimizer.state_dict(),
                              "scheduler": learner.scheduler.state_dict(),
                              "ranks": ranks, "config": learner.config.saved()})
    rt.barrier()


def _log(log: MetricsLog | None, evaluator: Evaluator, learner: Learner, *, step: int,
         loss: torch.Tensor | None, clock: tuple[float, int]) -> None:
    """Evaluate on every rank (each holds a slice of the data); rank 0 writes the row.
    ``clock``: seconds and images trained since the last row."""
    config = learner.config
    row = {"step": step, "samples": step * config.batch_size, "lr": learner.lr}
    if config.world == "real":
        row["epoch"] = step * config.batch_size / config.n
    row.update(evaluator.run(learner.eval_model))
    if loss is not None:
        row["batch_loss"] = float(loss.detach())
    if clock[0] > 0:
        row["images_per_s"] = clock[1] / clock[0]  # training only, all ranks
    if log is not None:
        log.append(row)
