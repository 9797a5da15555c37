"""``train-labeler``: train a CIFAR-10 labeler, airbench-style, with exact resume.

Recipe (after airbench94, Jordan 2024): whole split held as a uint8 tensor on the
device, random crop (2 px translate) + flip done there in one gather, frozen 2x2
patch-whitening first layer, Nesterov SGD with a triangular LR (0.2 -> 1 at 20 % of
the run -> 0.07), 64x LR on biases, label smoothing 0.2, summed loss with LR/WD
scaled per 1024 images, flip TTA at test time.

Every random draw is a pure function of (seed, epoch) or (seed, step), so a run
resumed from a checkpoint continues bit-for-bit like the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cifar5m.core.atomic import atomic_write_bytes
from cifar5m.core.augment import crop_flip
from cifar5m.core.checkpoint import load_checkpoint, save_checkpoint
from cifar5m.generator.labeler import CIFAR10_MEAN, CIFAR10_STD, Labeler, build_net, save_labeler
from cifar5m.generator.training import training_autocast

CONFIG_NAME = "train_config.json"


@dataclass(frozen=True)
class LabelerTrainConfig:
    data: str
    out: str
    arch: str = "airbench"
    widths: tuple[int, ...] = (64, 256, 256)
    epochs: float = 10.0
    batch_size: int = 1024
    lr: float = 11.5            # per 1024 images, summed loss (airbench94's scaling)
    momentum: float = 0.85
    weight_decay: float = 0.0153
    bias_scale: float = 64.0
    label_smoothing: float = 0.2
    whiten_bias_epochs: float = 3.0
    translate: int = 2
    seed: int = 0
    max_train: int | None = None  # use only the first N train samples (tests, quick runs)
    max_test: int | None = None
    checkpoint_every: int = 200   # steps
    precision: str = "auto"     # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    work: str | None = None       # checkpoint dir; default <out>-work
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def work_dir(self) -> Path:
        return Path(self.work) if self.work else Path(f"{self.out}-work")

    def fingerprint(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("out", "work", "checkpoint_every", "compile"):
            d.pop(k)
        d["widths"] = list(d["widths"])
        return d


def load_tensors(data: str, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A split of a cifar5m dataset as (uint8 NCHW images, int64 labels, class names).

    ``limit`` takes a class-balanced subset (datasets are often stored class by class).
    """
    from cifar5m.shards.index import balanced_subset
    from cifar5m.shards.reader import Dataset

    ds = Dataset(data)
    _, images, labels = ds.split(split).load()
    names = list(ds.manifest.class_names)
    if limit is not None and limit < len(labels):
        keep = balanced_subset(labels, limit, seed=0, num_classes=len(names))
        images, labels = images[keep], labels[keep]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(labels).long(), names


def augment(images: torch.Tensor, gen: torch.Generator, translate: int) -> torch.Tensor:
    """Random translate (reflect-padded crop) and horizontal flip, one batched gather."""
    n, dev = images.shape[0], images.device
    shift = torch.randint(0, 2 * translate + 1, (2, n), generator=gen).to(dev)
    flip = torch.rand(n, generator=gen).to(dev) < 0.5
    return crop_flip(images.float(), shift[0][:, None], shift[1][:, None], flip, pad=translate,
                     padding="reflect")


def lr_factor(step: int, total: int) -> float:
    """Triangular schedule: 0.2 -> 1 over the first 20 % of steps, then down to 0.07."""
    return float(np.interp(step, [0, max(1, int(0.2 * total)), total], [0.2, 1.0, 0.07]))


def make_optimizer(net: torch.nn.Module, cfg: LabelerTrainConfig) -> torch.optim.SGD:
    kilo = 1024 * (1 + 1 / (1 - cfg.momentum))  # airbench: undo the summed loss and momentum gain
    lr, wd = cfg.lr / kilo, cfg.weight_decay * cfg.batch_size / kilo
    biases = [p for n, p in net.named_parameters() if p.requires_grad and p.ndim < 2]
    weights = [p for n, p in net.named_parameters() if p.requires_grad and p.ndim >= 2]
    groups = [dict(params=weights, lr=lr, weight_decay=wd / lr, base_lr=lr),
              dict(params=biases, lr=lr * cfg.bias_scale, weight_decay=wd / (lr * cfg.bias_scale),
                   base_lr=lr * cfg.bias_scale)]
    return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=True)


def evaluate(labeler: Labeler, x: torch.Tensor, y: torch.Tensor) -> float:
    probs = labeler.predict(x, tta=True)
    return float((probs.argmax(1).cpu() == y).float().mean())


class _Run:
    """State of one training run: data, net, optimizer, position."""

    def __init__(self, cfg: LabelerTrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)
        x, y, self.class_names = load_tensors(cfg.data, "train", cfg.max_train)
        self.x, self.y = x.to(device), y.to(device)
        self.mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1) * 255
        self.arch_kwargs: dict[str, Any] = {"num_classes": len(self.class_names)}
        if cfg.arch == "airbench":
            self.arch_kwargs["widths"] = list(cfg.widths)
        self.net = build_net(cfg.arch, self.arch_kwargs).to(device)
        if hasattr(self.net, "init_whitening"):
            self.net.init_whitening(self.normalize(self.x[:5000].float()))
        if device.type == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)
        self.opt = make_optimizer(self.net, cfg)
        self.steps_per_epoch = max(1, len(self.x) // cfg.batch_size)
        self.total = max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch))
        idx = perm[i * self.cfg.batch_size : (i + 1) * self.cfg.batch_size].to(self.device)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        return self.normalize(augment(self.x[idx], gen, self.cfg.translate)), self.y[idx]

    def train_step(self, model: torch.nn.Module) -> float:
        cfg = self.cfg
        factor = lr_factor(self.step, self.total)
        frozen_bias = self.step >= cfg.whiten_bias_epochs * self.steps_per_epoch
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        if frozen_bias and hasattr(self.net, "whiten"):
            self.net.whiten.bias.requires_grad_(False)
        x, y = self.batch(self.step)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with training_autocast(self.device, cfg.precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing, reduction="sum")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return float(loss.detach()) / len(y)

    def state(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                "history": self.history, "train_seconds": self.train_seconds,
                "fingerprint": self.cfg.fingerprint()}

    def save(self) -> None:
        save_checkpoint(self.cfg.work_dir, self.state())

    def try_resume(self) -> bool:
        state = load_checkpoint(self.cfg.work_dir, fingerprint=self.cfg.fingerprint())
        if state is None:
            return False
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.history = state["step"], state["history"]
        self.train_seconds = state["train_seconds"]
        if self.step >= self.cfg.whiten_bias_epochs * self.steps_per_epoch and hasattr(self.net, "whiten"):
            self.net.whiten.bias.requires_grad_(False)
        return True


def train_labeler(cfg: LabelerTrainConfig, *, device: str | None = None, stop_after: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a labeler and save it to ``cfg.out``; returns its metrics.

    ``stop_after`` ends the run after that many total steps with only a checkpoint
    written, as a crash would (used by the resume tests).
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = _Run(cfg, dev)
    resumed = run.try_resume()
    model = torch.compile(run.net) if cfg.compile else run.net
    end = run.total if stop_after is None else min(run.total, stop_after)
    bar = tqdm(total=run.total, initial=run.step, disable=not progress, unit="step",
               desc=f"train-labeler{' (resumed)' if resumed else ''}")
    run.net.train()
    while run.step < end:
        t0 = time.perf_counter()
        loss = run.train_step(model)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        run.train_seconds += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{run.step * cfg.batch_size / max(run.train_seconds, 1e-9):.0f}")
        if run.step % run.steps_per_epoch == 0:
            run.history.append({"epoch": run.step / run.steps_per_epoch, "loss": loss})
        if run.step % cfg.checkpoint_every == 0 or run.step == end:
            run.save()
    bar.close()
    if run.step < run.total:
        return {"stopped_at": run.step}
    return _finish(run)


def _finish(run: _Run) -> dict[str, Any]:
    cfg = run.cfg
    lab = Labeler(run.net, arch=cfg.arch, arch_kwargs=run.arch_kwargs, class_names=run.class_names).to(run.device)
    x_test, y_test, _ = load_tensors(cfg.data, "test", cfg.max_test)
    t0 = time.perf_counter()
    acc = evaluate(lab, x_test, y_test)
    params = sum(p.numel() for p in run.net.parameters())
    metrics = {
        "test_accuracy": round(acc, 5), "test_samples": len(y_test), "tta": "flip",
        "train_seconds": round(run.train_seconds, 1), "eval_seconds": round(time.perf_counter() - t0, 1),
        "steps": run.step, "epochs": cfg.epochs, "train_samples": len(run.y), "params": params,
        "device": torch.cuda.get_device_name() if run.device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "data": cfg.data, "torch": torch.__version__, "history": run.history,
    }
    out = save_labeler(run.net, cfg.out, arch=cfg.arch, arch_kwargs=run.arch_kwargs,
                       class_names=run.class_names, metrics=metrics)
    cfg_json = {**asdict(cfg), "widths": list(cfg.widths)}
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(cfg_json, indent=2) + "\n").encode())
    return metrics

