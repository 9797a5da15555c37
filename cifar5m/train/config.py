"""The configs of the train stage: a stream of batches (``StreamConfig``), one training run
(``TrainConfig``, saved as ``config.json`` next to its metrics) and a Deep Bootstrap sweep of
runs (``BootstrapConfig``, saved as ``bootstrap.json``), with the directory names of a sweep's
runs. Imports no torch, so the CLI reads its defaults from here."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass

from cifar5m.core.errors import ModelError, TrainConfigError
from cifar5m.train.order import DEFAULT_BLOCK, DEFAULT_WINDOW

# The paper's `--aug 0-3`: none, flips, crop (zero padding 4) + flip, reflect-padded crop + flip.
AUGMENTATIONS = ("none", "flip", "crop-flip", "reflect-crop-flip")
# The paper's schedule: (below this step, log every this many steps), then every `every`.
PAPER_DENSE: tuple[tuple[int, int], ...] = ((1024, 4), (2048, 8))


# The models of cifar5m.train.models (its registry, MODELS, is checked against this list).
ARCHS = ("preresnet18", "mlp", "mcnn", "vit", "vgg11_bn")


def check_model(name: str) -> None:
    """Raise ``ModelError`` now for a name ``build_model`` would refuse (no model built)."""
    if parse_widths(name) is None and name not in ARCHS:
        raise ModelError(f"unknown model {name!r}; choose one of {sorted(ARCHS)} or mlp[w1,w2,...]")


def parse_widths(name: str) -> tuple[int, ...] | None:
    """``"mlp[512,512]"`` -> (512, 512); None for a plain registry name."""
    if not (name.startswith("mlp[") and name.endswith("]")):
        return None
    try:
        widths = tuple(int(w) for w in name[4:-1].split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise ModelError(f"bad MLP widths in {name!r}; write e.g. mlp[2048,2048,2048]")
    return widths


def parse_dense(text: str) -> tuple[tuple[int, int], ...]:
    """``"1024:4,2048:8"`` -> ((1024, 4), (2048, 8)); ``"none"`` or ``""`` -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    pairs = []
    for part in text.split(","):
        below, _, stride = part.partition(":")
        pairs.append((int(below), int(stride)))
    return tuple(pairs)


def format_dense(dense: tuple[tuple[int, int], ...]) -> str:
    """((1024, 4), (2048, 8)) -> ``"1024:4,2048:8"`` (``"none"`` for ())."""
    return ",".join(f"{below}:{every}" for below, every in dense) or "none"


@dataclass(frozen=True)
class StreamConfig:
    """Everything that defines a stream; saved as JSON next to a run (``to_json``)."""

    source: str
    world: str = "ideal"  # "ideal": fresh samples; "real": epochs over a fixed subset of n
    n: int | None = None  # real-world subset size
    batch_size: int = 128  # GLOBAL batch (all ranks together)
    steps: int | None = None  # global batches; None: ideal = all the split allows, real = 1 epoch
    seed: int = 0
    split: str = "train"
    rank: int | None = None  # None: torch.distributed, else $RANK, else 0
    world_size: int | None = None  # None: torch.distributed, else $WORLD_SIZE, else 1
    num_workers: int = 0
    class_balanced: bool = False
    wrap: bool = False  # ideal world: start a new permutation instead of raising
    return_keys: bool = False
    pin_memory: bool = False
    prefetch: int = 2  # batches prepared ahead (per worker; without workers: in a thread)
    cache_dir: str | None = None  # decoded-shard cache (ideal) / decoded subset (real)
    cache_bytes: int | None = None  # size cap of cache_dir (LRU eviction)
    storage_options: dict | None = None  # for fsspec URLs, e.g. {"endpoint_url": ...}
    block: int = DEFAULT_BLOCK
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", os.fspath(self.source))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> StreamConfig:
        return cls(**json.loads(text))


# Fields that may change between a run and its resume without changing the curve.
RESUMABLE_FIELDS = {"stop_after", "device", "num_workers", "checkpoint_every", "compile",
                    "storage_options"}
# Not written to config.json or checkpoints: fsspec options may hold credentials.
UNSAVED_FIELDS = {"storage_options"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` next to its metrics."""

    data: str
    world: str = "ideal"  # "real": N samples reused; "ideal": every batch fresh
    n: int | None = None  # real world: number of samples (required)
    arch: str = "preresnet18"
    width: int | None = None  # None = the paper's size; small values for tests
    steps: int = 39_000  # 100 epochs of 50K at batch 128
    batch_size: int = 128  # global, over all ranks
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine" over `steps`, or "constant"
    lr_step_every: int = 1  # cosine stepped every this many batches (the paper's code: 390)
    augment: str = "none"  # "none", "flip", "crop-flip", "reflect-crop-flip" (the paper's 0-3)
    seed: int = 0  # model init, sample order and augmentation
    class_balanced: bool = False
    wrap: bool = False  # ideal world: past one pass over the split, repeat it (new permutation)
    log_every: int = 64
    log_dense: tuple[tuple[int, int], ...] = PAPER_DENSE
    test_split: str = "test"
    test_limit: int | None = 10_000  # first samples of the test split evaluated
    cifar10_test: str | None = None  # a dataset dir whose test split is CIFAR-10 test
    train_eval_limit: int | None = None  # real world: evaluate on this many of the N
    eval_batch_size: int = 1000
    checkpoint_every: int = 1000
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp32"
    channels_last: bool = True
    compile: bool = False
    device: str = "auto"
    num_workers: int = 0
    record_keys: bool = False  # write the keys of every batch (tests, audits)
    stop_after: int | None = None  # stop (as if killed) after this many steps
    storage_options: dict | None = None  # fsspec options for --data (s3:// endpoint, ...); not saved

    def __post_init__(self) -> None:
        object.__setattr__(self, "log_dense", tuple(tuple(p) for p in self.log_dense))
        problems = []
        if self.world not in ("real", "ideal"):
            problems.append(f"world must be 'real' or 'ideal', got {self.world!r}")
        if self.world == "real" and not self.n:
            problems.append("the real world needs --n (the number of samples it reuses)")
        if self.augment not in AUGMENTATIONS:
            problems.append(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if self.schedule not in ("cosine", "constant"):
            problems.append(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.steps < 1 or self.batch_size < 1 or self.log_every < 1 or self.lr_step_every < 1:
            problems.append("steps, batch_size, log_every and lr_step_every must be positive")
        if problems:
            raise TrainConfigError("; ".join(problems))

    def saved(self) -> dict:
        """The fields written to config.json and checkpoints (no storage options)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in UNSAVED_FIELDS}

    def to_json(self) -> str:
        return json.dumps(self.saved(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls(**json.loads(text))

    def curve_fields(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RESUMABLE_FIELDS}


# The paper trains the real world until its train error is small; a run counts as converged at
# the first log point where its train soft error is below this.
DEFAULT_THRESHOLD = 0.01


@dataclass(frozen=True)
class BootstrapConfig:
    """A run template (its ``world``, ``n``, ``arch`` and ``seed`` are replaced per run)."""

    template: TrainConfig
    ns: tuple[int, ...]
    archs: tuple[str, ...] = ("preresnet18",)
    seeds: tuple[int, ...] = (0,)
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        if not self.ns or min(self.ns) < 1:
            raise TrainConfigError(f"bootstrap needs one or more positive N, got {self.ns}")
        if not self.archs or not self.seeds:
            raise TrainConfigError("bootstrap needs at least one model and one seed")
        if not 0 < self.threshold < 1:
            raise TrainConfigError(f"the convergence threshold must be in (0, 1), got {self.threshold}")
        for arch in self.archs:
            check_model(arch)

    def run(self, arch: str, world: str, seed: int, n: int | None = None) -> TrainConfig:
        """One run's config. The real world never wraps, so ``--wrap`` leaves its runs valid."""
        width = None if parse_widths(arch) else self.template.width
        return dataclasses.replace(self.template, arch=arch, width=width, world=world, seed=seed,
                                   n=n if world == "real" else None,
                                   wrap=self.template.wrap and world == "ideal")

    def runs(self) -> list[tuple[str, TrainConfig]]:
        """(directory under out, config) of every run, each model's ideal worlds first."""
        out = []
        for arch in self.archs:
            for seed in self.seeds:
                out.append((run_name(arch, seed), self.run(arch, "ideal", seed)))
                out += [(run_name(arch, seed, n), self.run(arch, "real", seed, n)) for n in self.ns]
        return out

    def to_json(self) -> str:
        return json.dumps({"template": self.template.saved(), "ns": list(self.ns),
                           "archs": list(self.archs), "seeds": list(self.seeds),
                           "threshold": self.threshold}, indent=2, sort_keys=True) + "\n"


def slug(arch: str) -> str:
    """A directory name for a model: ``mlp[512,512]`` -> ``mlp-512-512``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", arch).strip("-")


def run_name(arch: str, seed: int, n: int | None = None) -> str:
    """A run's directory under the sweep's output: the ideal world when ``n`` is None."""
    return f"{slug(arch)}/" + (f"ideal-seed{seed}" if n is None else f"real-n{n}-seed{seed}")
