"""The one frozen config of a generation run, and what of it defines the dataset."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cifar5m.generator.model import DEFAULT_MODEL
from cifar5m.shards.format import IMAGE_FORMATS

# Here, not in cifar5m.generator.sampler, so that checking a config (and --dry-run of the
# default model) never imports torch: cifar5m.generator.sampler imports it at the top.
SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "unipc")
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 100, "dpmsolver++": 20, "unipc": 20}

NOISE_SCHEME = "lowbias32-boxmuller-v1"  # cifar5m.generator.noise; bump if its output changes
CONFIG_NAME = "generate_config.json"


@dataclass(frozen=True)
class GenerateConfig:
    """Everything ``cifar5m generate`` takes. Saved as ``generate_config.json`` in the output."""

    count: int
    out: str
    model: str = DEFAULT_MODEL
    # None / "auto" fields are chosen by the device (cifar5m.generator.defaults.for_device): on CPU
    # DPM-Solver++ in bf16 with oneDNN, on CUDA the CIFAR-5m setting (DDPM 1000 steps, bf16,
    # compiled). The resolved values are what generate_config.json and the manifest record.
    sampler: str | None = None
    steps: int | None = None  # None: the device's default for the sampler
    labeler: str | None = None  # path, "builtin", or None/"none" (conditional models only)
    seed: int = 0
    batch_size: int = 256
    shard_size: int = 10_000
    test_count: int | None = None  # None: 10,000 from count 60,000 up, else count // 6
    image_format: str = "png"
    min_confidence: float = 0.0
    balance: bool = False
    device: str = "auto"  # auto: cuda:LOCAL_RANK if available, else cpu
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool | None = None  # None: on for CUDA
    # CPU only. True: native conv kernels, so every image's bytes are independent of the
    # batch size and rank. False: oneDNN, much faster (bf16 on AMX/AVX512-BF16 CPUs), but
    # bit-exact only for the same batch size. None: False on CPU (see cifar5m.generator.defaults).
    exact_cpu: bool | None = None
    workers: int = 2  # background shard writers (PNG encoding + tar + sha256)
    staging: str | None = None  # URL outputs: rank 0's scratch dir for the index; default: temp

    def __post_init__(self) -> None:
        problems = []
        if self.count < 1:
            problems.append(f"--count must be positive, got {self.count}")
        if self.test_count is not None and not 0 <= self.test_count < self.count:
            problems.append(f"--test-count must be in [0, count) = [0, {self.count}), got {self.test_count}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            problems.append(f"unknown sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        if self.steps is not None and self.steps < 1:
            problems.append(f"--steps must be positive, got {self.steps}")
        if self.batch_size < 1 or self.shard_size < 1 or self.workers < 1:
            problems.append("--batch-size, --shard-size and --workers must be positive")
        if self.image_format not in IMAGE_FORMATS:
            problems.append(f"unknown image format {self.image_format!r}; use one of {IMAGE_FORMATS}")
        if not 0.0 <= self.min_confidence < 1.0:
            problems.append(f"--min-confidence must be in [0, 1), got {self.min_confidence}")
        if not 0 <= self.seed < 2**63:
            problems.append(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"unknown dtype {self.dtype!r}; use auto, fp32, bf16 or fp16")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def num_steps(self) -> int:
        if self.sampler is None:
            raise ValueError("the sampler is chosen by the device: resolve the config first "
                             "(cifar5m.generator.defaults.for_device)")
        return self.steps if self.steps is not None else DEFAULT_STEPS[self.sampler]

    @property
    def labeler_path(self) -> str | None:
        return None if self.labeler in (None, "", "none") else self.labeler

    @property
    def filtered(self) -> bool:
        return self.min_confidence > 0 or self.balance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint(cfg: GenerateConfig, *, model_sha256: str, labeler_sha256: str | None,
                dtype: str) -> dict[str, Any]:
    """The settings that decide the samples. Not count (extending is allowed), batch size,
    workers, device or ranks (they do not change the images; see docs/generate.md on GPUs)."""
    return {
        "generator": "cifar5m generate", "noise": NOISE_SCHEME, "model_sha256": model_sha256,
        "sampler": cfg.sampler, "steps": cfg.num_steps, "seed": cfg.seed,
        "labeler_sha256": labeler_sha256, "min_confidence": cfg.min_confidence,
        "balance": cfg.balance, "test_count": cfg.test_count, "dtype": dtype,
        "image_format": cfg.image_format, "shard_size": cfg.shard_size,
    }
