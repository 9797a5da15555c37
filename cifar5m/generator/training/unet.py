"""``train-generator``: DDPM training of a diffusers ``UNet2DModel`` on a cifar5m dataset.

The default config is Ho et al. 2020's CIFAR-10 model (35,746,307 parameters: channels
128/256/256/256, two res blocks per level, attention at 16x16, dropout 0.1; 1000 steps,
linear betas 1e-4..0.02; Adam 2e-4, batch 128, warmup 5000, grad clip 1, EMA 0.9999,
random flips, 800k steps).

Output (``--out DIR``) loads with ``UNet2DModel.from_pretrained(DIR)`` and
``DDPMScheduler.from_pretrained(DIR)`` (scheduler_config.json at the root, as in
google/ddpm-cifar10-32) or ``from_pretrained(DIR, subfolder="scheduler")``.
The saved weights are the EMA weights.

Resume is exact at the same number of ranks: batches, noise, timesteps and dropout are
drawn from generators seeded by (seed, step, rank), and the checkpoint holds model, EMA,
optimizer and step. Resumed under another number of torchrun ranks, training goes on with
the same global batch but other draws (elastic, not bit-identical).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cifar5m.core.checkpoint import load_checkpoint, save_checkpoint
from cifar5m.core.errors import TrainConfigError
from cifar5m.generator import rendezvous
from cifar5m.generator.training import replace_dir, training_autocast

CONFIG_NAME = "train_config.json"


@dataclass(frozen=True)
class UNetTrainConfig:
    data: str
    out: str
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    layers_per_block: int = 2
    attention_levels: tuple[int, ...] = (1,)   # level 1 = 16x16 at 32x32 input
    attention_head_dim: int | None = None      # None: one head per layer, as in Ho et al.
    norm_num_groups: int = 32
    dropout: float = 0.1
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    lr: float = 2e-4
    batch_size: int = 128                      # global (split over DDP ranks)
    warmup_steps: int = 5000
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False                   # decay min(ema_decay, (1+s)/(10+s)) for short runs
    steps: int = 800_000
    random_flip: bool = True
    seed: int = 0
    max_train: int | None = None
    checkpoint_every: int = 1000
    sample_every: int = 5000
    sample_count: int = 64
    sample_steps: int = 50                     # DDIM steps for the progress grid
    precision: str = "auto"                    # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    work: str | None = None                    # checkpoints and grids; default <out>-work

    @property
    def work_dir(self) -> Path:
        return Path(self.work) if self.work else Path(f"{self.out}-work")

    def fingerprint(self) -> dict[str, Any]:
        d = json.loads(json.dumps(asdict(self)))
        for k in ("out", "work", "checkpoint_every", "sample_every", "sample_count", "sample_steps",
                  "compile", "steps"):
            d.pop(k)  # may change between a run and its resumption (e.g. train longer)
        return d


def build_unet(cfg: UNetTrainConfig):
    from diffusers import UNet2DModel

    levels = len(cfg.block_out_channels)
    down = tuple("AttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if levels - 1 - i in cfg.attention_levels else "UpBlock2D" for i in range(levels))
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block, down_block_types=down, up_block_types=up,
        attention_head_dim=cfg.attention_head_dim, norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout, time_embedding_type="positional", freq_shift=1, flip_sin_to_cos=False,
        downsample_padding=0, mid_block_scale_factor=1, act_fn="silu", norm_eps=1e-6,
        center_input_sample=False,
    )


def build_scheduler(cfg: UNetTrainConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end, clip_sample=True,
                         variance_type="fixed_large")


def _seeded(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(parts)).generate_state(1)[0]))


@torch.no_grad()
def sample_images(unet, scheduler_config: dict, *, count: int, steps: int, seed: int,
                  device: torch.device) -> np.ndarray:
    """``count`` images (uint8 NHWC) with DDIM at ``steps`` steps, noise fixed by ``seed``."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing")
    sched.set_timesteps(min(steps, sched.config.num_train_timesteps))
    x = torch.randn(count, 3, 32, 32, generator=_seeded(seed, 7)).to(device)
    was_training = unet.training
    unet.eval()
    for t in sched.timesteps:
        eps = unet(x, t.to(device)).sample
        x = sched.step(eps, t, x).prev_sample
    unet.train(was_training)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class _Trainer:
    def __init__(self, cfg: UNetTrainConfig, device: torch.device) -> None:
        from cifar5m.generator.training.labeler_recipe import load_tensors

        self.cfg, self.device = cfg, device
        env = rendezvous.from_env()
        self.rank, self.world = env.rank, env.world
        torch.manual_seed(cfg.seed)
        x, _, _ = load_tensors(cfg.data, "train", cfg.max_train)
        self.x = x.to(device)
        self.unet = build_unet(cfg).to(device)
        self.scheduler = build_scheduler(cfg)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.ema = [p.detach().clone().float() for p in self.unet.parameters()]
        self.opt = torch.optim.Adam(self.unet.parameters(), lr=cfg.lr)
        self.model = self.unet
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.unet, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.step, self.train_seconds, self.losses = 0, 0.0, []
        self.local_batch = cfg.batch_size // self.world  # train_generator checked it divides

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = _seeded(self.cfg.seed, self.step, self.rank)
        idx = torch.randint(0, len(self.x), (self.local_batch,), generator=gen)
        x0 = self.x[idx.to(self.device)].float() / 127.5 - 1
        if self.cfg.random_flip:
            flip = (torch.rand(self.local_batch, generator=gen) < 0.5).to(self.device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        t = torch.randint(0, self.cfg.num_train_timesteps, (self.local_batch,), generator=gen).to(self.device)
        return x0, noise, t

    def train_step(self) -> float:
        cfg = self.cfg
        x0, noise, t = self.batch()
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        torch.manual_seed(int(_seeded(cfg.seed, self.step, self.rank, 1).initial_seed()))  # dropout
        with training_autocast(self.device, cfg.precision):
            pred = self.model(xt, t).sample
        loss = F.mse_loss(pred.float(), noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), cfg.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup_steps))
        self.opt.step()
        decay = cfg.ema_decay
        if cfg.ema_warmup:
            decay = min(decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.unet.parameters()], 1 - decay)
        self.step += 1
        return float(loss.detach())

    def ema_unet(self):
        """A copy of the UNet holding the EMA weights (what gets saved and sampled)."""
        import copy

        model = copy.deepcopy(self.unet)
        with torch.no_grad():
            for p, e in zip(model.parameters(), self.ema, strict=True):
                p.copy_(e)
        return model

    def save_checkpoint(self) -> None:
        state = {"unet": self.unet.state_dict(), "ema": self.ema, "opt": self.opt.state_dict(),
                 "step": self.step, "train_seconds": self.train_seconds, "losses": self.losses,
                 "rng": torch.get_rng_state(), "fingerprint": self.cfg.fingerprint()}
        save_checkpoint(self.cfg.work_dir, state)

    def try_resume(self) -> bool:
        state = load_checkpoint(self.cfg.work_dir, fingerprint=self.cfg.fingerprint())
        if state is None:
            return False
        self.unet.load_state_dict(state["unet"])
        self.opt.load_state_dict(state["opt"])
        with torch.no_grad():
            for e, s in zip(self.ema, state["ema"], strict=True):
                e.copy_(s)
        self.step, self.train_seconds, self.losses = state["step"], state["train_seconds"], state["losses"]
        torch.set_rng_state(state["rng"])
        return True

    def grid(self, path: Path) -> Path:
        images = sample_images(self.ema_unet(), dict(self.scheduler.config), count=self.cfg.sample_count,
                               steps=self.cfg.sample_steps, seed=self.cfg.seed, device=self.device)
        from cifar5m.generator.report.figures import write_grid

        return write_grid(images, path)


def save_generator(trainer: _Trainer, out: Path, metrics: dict[str, Any]) -> Path:
    """EMA UNet + scheduler in diffusers layout, atomically (build beside, rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.ema_unet().to("cpu").save_pretrained(tmp, safe_serialization=True)
    trainer.scheduler.save_pretrained(tmp)
    trainer.scheduler.save_pretrained(tmp / "scheduler")
    cfg_json = json.dumps(asdict(trainer.cfg), indent=2) + "\n"
    (tmp / CONFIG_NAME).write_text(cfg_json)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return replace_dir(tmp, out)


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = rendezvous.from_env().local_rank
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def train_generator(cfg: UNetTrainConfig, *, device: str | None = None, stop_after: int | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the UNet; save it to ``cfg.out`` when ``cfg.steps`` are done.

    ``stop_after`` ends the run after that many total steps with only a checkpoint
    written, as a crash would (the resume tests use it).
    """
    env = rendezvous.from_env()
    rank, world = env.rank, env.world
    if cfg.batch_size % world:  # else each rank took batch // world: a smaller batch than asked
        raise TrainConfigError(f"--batch-size {cfg.batch_size} does not split evenly over {world} torchrun "
                               f"processes; use a multiple of {world}")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    dev = torch.device(device) if device else _device()
    tr = _Trainer(cfg, dev)
    resumed = tr.try_resume()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=tr.step, disable=not progress or rank != 0, unit="step",
               desc=f"train-generator{' (resumed)' if resumed else ''}")
    tr.unet.train()
    while tr.step < end:
        t0 = time.perf_counter()
        loss = tr.train_step()
        tr.train_seconds += time.perf_counter() - t0
        tr.losses.append(round(loss, 5))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(tr.losses[-100:]):.4f}", img_s=f"{cfg.batch_size / (time.perf_counter() - t0):.0f}")
        if rank == 0 and (tr.step % cfg.checkpoint_every == 0 or tr.step == end):
            tr.save_checkpoint()
        if rank == 0 and cfg.sample_every and tr.step % cfg.sample_every == 0:
            tr.grid(cfg.work_dir / "samples" / f"step_{tr.step:07d}.png")
    bar.close()
    if tr.step < cfg.steps:
        return {"stopped_at": tr.step}
    metrics = {"steps": tr.step, "train_seconds": round(tr.train_seconds, 1),
               "images_seen": tr.step * cfg.batch_size, "train_samples": len(tr.x),
               "final_loss_mean_last_1000": float(np.mean(tr.losses[-1000:])),
               "params": sum(p.numel() for p in tr.unet.parameters()), "world_size": world,
               "device": torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
               "data": cfg.data, "torch": torch.__version__}
    if rank == 0:
        out = save_generator(tr, Path(cfg.out), metrics)
        tr.grid(out / "sample_grid.png")
        (out / "loss_curve.json").write_text(json.dumps(tr.losses[::max(1, len(tr.losses) // 2000)]))
    if world > 1:
        torch.distributed.barrier()
    return metrics
