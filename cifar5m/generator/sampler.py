"""The sampling loop: diffusers schedulers driven by our own loop, not DDPMPipeline.

Why our own loop: the batch stays on the device as float32 latents while the UNet
runs in bf16 + channels_last (and optionally ``torch.compile``d); noise comes from
``cifar5m.generator.noise`` per sample and the CPU runs fixed micro-batches, so results do not depend on batch composition.

Samplers (all 1 UNet evaluation per step; UniPC's corrector reuses the next call):

* ``ddpm``: ancestral DDPM with the model's variance (``fixed_large`` for
  google/ddpm-cifar10-32, sigma_t^2 = beta_t), x0 clipped as the scheduler config says.
  Written here (same formulas as ``DDPMScheduler.step``) because diffusers draws the
  step noise itself; ours comes from stream ``1 + step`` of ``cifar5m.generator.noise``.
* ``ddim``: eta = 0 with the DDIM paper's quadratic timestep skip, run as
  ``DPMSolverMultistepScheduler(solver_order=1, dpmsolver++)`` (first-order
  DPM-Solver++ is exactly DDIM) with explicit timesteps. ``DDIMScheduler`` is not used:
  it takes no custom timesteps and its ``prev_t = t - T // steps`` is off by one
  for ``linspace`` spacing (diffusers #12633).
* ``dpmsolver++`` / ``unipc``: multistep order 3 (the diffusers docs' advice for
  unconditional models), x0 thresholded to [-1, 1], default linspace timesteps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar5m.core.errors import ModelError
from cifar5m.generator import noise
from cifar5m.generator.config import SAMPLERS

IMAGE_CHW = (3, 32, 32)
CPU_CHUNK = 16  # UNet micro-batch on the CPU (see Sampler.__init__)


def quadratic_timesteps(steps: int, num_train_timesteps: int) -> list[int]:
    """The DDIM repo's ``skip_type="quad"``: floor((i * sqrt(0.8 T) / (S - 1))**2), descending.

    The formula repeats t = 0 a few times (0, 0, 0, 0, 1, 2, ... at 100 steps); repeats
    are bumped up by one so every step is a distinct timestep and NFE == steps.
    """
    if steps == 1:
        return [0]
    seq = (np.linspace(0, np.sqrt(num_train_timesteps * 0.8), steps) ** 2).astype(np.int64)
    for k in range(1, len(seq)):
        seq[k] = max(seq[k], seq[k - 1] + 1)
    return [int(t) for t in seq[::-1]]


def build_scheduler(sampler: str, scheduler_config: dict[str, Any], steps: int, *,
                    device: str | torch.device | None = None) -> Any:
    """A diffusers scheduler with the model's betas, timesteps set for ``steps`` (on ``device``)."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    total = int(cfg.get("num_train_timesteps", 1000))
    if sampler not in SAMPLERS:
        raise ModelError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    if not 1 <= steps <= total:
        raise ModelError(f"--steps must be in [1, {total}] (the model's training timesteps), got {steps}")
    if sampler == "ddpm":
        sched = DDPMScheduler.from_config(cfg)
        if sched.config.variance_type not in ("fixed_small", "fixed_large"):
            raise ModelError(f"ddpm sampler: variance_type {sched.config.variance_type!r} unsupported")
        sched.set_timesteps(steps, device=device)
        return sched
    if sampler == "ddim":
        sched = DPMSolverMultistepScheduler.from_config(
            cfg, algorithm_type="dpmsolver++", solver_order=1, final_sigmas_type="zero",
            thresholding=False)
        sched.set_timesteps(timesteps=quadratic_timesteps(steps, total), device=device)
        return sched
    cls = DPMSolverMultistepScheduler if sampler == "dpmsolver++" else UniPCMultistepScheduler
    extra = {"algorithm_type": "dpmsolver++"} if sampler == "dpmsolver++" else {"predict_x0": True}
    sched = cls.from_config(cfg, solver_order=3, thresholding=True, sample_max_value=1.0, **extra)
    sched.set_timesteps(steps, device=device)
    return sched


class SharedTimeEmbedding(nn.Module):
    """Runs the time-embedding MLP on one row and broadcasts it to the batch.

    Every sample of a batch is at the same timestep, so this is exact, and it makes
    the UNet's output per sample independent of the batch size on CPU: the MLP's
    ``Linear`` takes a gemv path at batch 1 and gemm above, which differ in the last bit.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, sample: torch.Tensor, *args: Any) -> torch.Tensor:
        return self.inner(sample[:1], *args).expand(sample.shape[0], -1)


class Sampler:
    """Turns sample ids into uint8 images, deterministically per (seed, id)."""

    def __init__(self, unet: nn.Module, scheduler_config: dict[str, Any], *, sampler: str,
                 steps: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 compile: bool = False) -> None:
        self.device, self.dtype, self.sampler = torch.device(device), dtype, sampler
        self.template = build_scheduler(sampler, scheduler_config, steps, device=self.device)
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        if not isinstance(unet.time_embedding, SharedTimeEmbedding):
            unet.time_embedding = SharedTimeEmbedding(unet.time_embedding)
        self.unet = unet.to(self.device, dtype=dtype, memory_format=self.memory_format).eval()
        self.forward = torch.compile(self.unet) if compile else self.unet
        # A compiled UNet recompiles for each new batch shape; pad short batches (a shard's
        # tail) up to the largest batch seen instead.
        self.pad = compile
        self.max_batch = 0
        # On the CPU, oneDNN picks its conv kernels by batch size, and they round differently
        # (a 1x1 conv differed by 1.8e-7 between batch 13 and 26 on an AVX-512 Xeon: batches
        # 2-8 agree, 16-64 agree, 1 stands alone), so pixels would depend on --batch-size. The
        # UNet sees only micro-batches of CPU_CHUNK (the tail padded); results do not depend on
        # a sample's place in a batch of fixed shape, so they are exactly per-sample.
        self.chunk = CPU_CHUNK if self.device.type == "cpu" and not compile else 0
        self.num_classes = unet.config.get("num_class_embeds")

    @property
    def timesteps(self) -> list[int]:
        return [int(t) for t in self.template.timesteps]

    @property
    def nfe(self) -> int:
        """UNet evaluations per image."""
        return len(self.template.timesteps)

    @torch.no_grad()
    def sample(self, seed: int, ids: torch.Tensor, *, class_labels: torch.Tensor | None = None,
               on_step: Callable[[int], Any] | None = None) -> torch.Tensor:
        """uint8 images (B, 32, 32, 3) on the CPU for sample ``ids`` (int64, (B,), on the CPU).

        ``on_step(B)`` is called after every step (progress: B image-steps done)."""
        noise.check_ids(ids)  # here, on the CPU: on the device every check would sync
        n = len(ids)
        self.max_batch = max(self.max_batch, n)
        size = self.max_batch if self.pad else -(-n // self.chunk) * self.chunk if self.chunk else n
        if size > n:  # repeat the last sample; its copies are dropped
            ids = torch.cat([ids, ids[-1:].expand(size - n)])
            if class_labels is not None:
                class_labels = torch.cat([class_labels, class_labels[-1:].expand(size - n)])
        ids = ids.to(self.device)
        x = noise.normal(seed, ids, 0, IMAGE_CHW)
        if class_labels is not None:
            class_labels = class_labels.to(self.device)
        sched = copy.deepcopy(self.template)  # multistep schedulers keep per-run state
        # Python ints for the scheduler maths (no device sync), device tensors for the UNet
        # (a compiled UNet would specialise, i.e. recompile, on each distinct int).
        steps = [int(t) for t in sched.timesteps.cpu()]
        for k, (t, t_dev) in enumerate(zip(steps, sched.timesteps, strict=True)):
            inp = sched.scale_model_input(x, t_dev).to(self.dtype).contiguous(memory_format=self.memory_format)
            out = self.denoise(inp, t_dev, class_labels).float()
            if self.sampler == "ddpm":
                prev = steps[k + 1] if k + 1 < len(steps) else -1
                x = ddpm_step(sched, out, t, prev, x, noise.normal(seed, ids, 1 + k, IMAGE_CHW))
            else:
                x = sched.step(out, t_dev, x).prev_sample
            if on_step is not None:
                on_step(n)
        x = x[:n]
        # Same quantisation as diffusers' DDPMPipeline: (x / 2 + 0.5) clamped, * 255, rounded.
        images = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu()

    def denoise(self, inp: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The UNet's prediction for ``inp``, in micro-batches of ``self.chunk`` where set."""
        step = self.chunk or len(inp)
        parts = [self.forward(inp[i:i + step], t,
                              class_labels=None if class_labels is None else class_labels[i:i + step])
                 for i in range(0, len(inp), step)]
        return torch.cat([p.sample for p in parts]) if len(parts) > 1 else parts[0].sample

def ddpm_step(sched: Any, model_output: torch.Tensor, t: int, prev: int, x: torch.Tensor,
              step_noise: torch.Tensor) -> torch.Tensor:
    """One ancestral DDPM step (Ho et al. eq. 7) from t to prev (-1 after the last step).

    The same formulas as ``DDPMScheduler.step`` with ``fixed_small``/``fixed_large``
    variance, but all coefficients are Python floats: no per-step device sync (diffusers
    looks ``prev`` up with a tensor ``nonzero``).
    """
    cfg = sched.config
    ab = float(sched.alphas_cumprod[t])
    ab_prev = float(sched.alphas_cumprod[prev]) if prev >= 0 else 1.0
    beta = 1 - ab / ab_prev
    if cfg.prediction_type == "epsilon":
        x0 = (x - (1 - ab) ** 0.5 * model_output) / ab**0.5
    elif cfg.prediction_type == "sample":
        x0 = model_output
    else:  # v_prediction
        x0 = ab**0.5 * x - (1 - ab) ** 0.5 * model_output
    if cfg.thresholding:
        x0 = sched._threshold_sample(x0)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    mean = (ab_prev**0.5 * beta / (1 - ab)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab)) * x
    if t == 0:
        return mean
    # fixed_large: sigma^2 = beta_t (Ho et al.'s better-FID choice on CIFAR-10);
    # fixed_small: the posterior variance, clamped as diffusers does.
    var = beta if cfg.variance_type == "fixed_large" else max((1 - ab_prev) / (1 - ab) * beta, 1e-20)
    return mean + var**0.5 * step_noise
