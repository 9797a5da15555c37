"""One rank's part of a ``generate`` run (``Session``): it picks the device and the settings
left to it, resolves the UNet and opens the labeler, samples and labels its shards while
threads write them, and on rank 0 finishes the dataset with the manifest's provenance.
What runs before and around it (checking the output, the ranks meeting) is in
``cifar5m.generator.pipeline``; the sampler itself in ``cifar5m.generator.sampler``."""

from __future__ import annotations

import contextlib
import json
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cifar5m.core.atomic import atomic_write_bytes
from cifar5m.core.errors import GenerationError, ModelError
from cifar5m.core.version import __version__
from cifar5m.generator import defaults
from cifar5m.generator import model as model_mod
from cifar5m.generator.config import CONFIG_NAME, GenerateConfig
from cifar5m.generator.plan import ShardPlan
from cifar5m.generator.rendezvous import Rank
from cifar5m.shards.format import CIFAR10_CLASSES
from cifar5m.shards.manifest import Manifest
from cifar5m.shards.writer import ShardRecord, finalize

NUM_CLASSES = len(CIFAR10_CLASSES)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def open_labeler(cfg: GenerateConfig, conditional: bool, device: Any) -> Any | None:
    if cfg.labeler_path is None:
        if not conditional:
            raise ModelError(
                f"model {cfg.model!r} is unconditional, so labels must come from a labeler: pass "
                f"--labeler PATH (a directory saved by save_labeler) or --labeler builtin")
        if cfg.filtered:
            raise ModelError("--min-confidence and --balance need a --labeler")
        return None
    from cifar5m.generator.labeler import load_labeler

    lab = load_labeler(cfg.labeler_path, device=device)
    if lab.num_classes != NUM_CLASSES:
        raise ModelError(f"labeler {cfg.labeler_path!r} has {lab.num_classes} classes; a CIFAR-10 "
                         f"labeler has {NUM_CLASSES}")
    return lab


def write_in_background(pool: ThreadPoolExecutor, pending: deque[Future], limit: int,
                        write: Callable[[ShardPlan, list], Any], plan: ShardPlan, samples: list) -> None:
    """Queue a shard write; block while more than ``limit`` are in flight (bounded memory)."""
    pending.append(pool.submit(write, plan, samples))
    while len(pending) > limit:
        pending.popleft().result()


class Session:
    def __init__(self, cfg: GenerateConfig, rank: Rank) -> None:
        import torch

        self.cfg, self.rank = cfg, rank
        if cfg.device == "auto":
            self.device = torch.device(f"cuda:{rank.local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            try:
                self.device = torch.device(cfg.device)
            except RuntimeError as exc:
                raise GenerationError(f"--device {cfg.device!r}: {exc}; use auto, cpu or cuda:N") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise GenerationError(f"--device {cfg.device!r}, but torch sees no CUDA device here; "
                                  f"use --device cpu (or auto)")
        if self.device.type == "cuda":
            if self.device.index is None:  # "cuda": the current device (torch 2.11 refuses an index-less one)
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)  # kernels that use "the current device" follow
        # Settings left to the device (sampler, steps, dtype, kernels, compile) are fixed here.
        self.chosen = defaults.chosen(cfg, self.device.type)
        self.cfg = cfg = defaults.for_device(cfg, self.device.type)
        self.dtype_name = cfg.dtype
        self.threads = defaults.sampling_threads(self.device.type)  # None: torch's own count
        self.source = model_mod.resolve(cfg.model)
        total = int(self.source.scheduler_config.get("num_train_timesteps", 1000))
        if cfg.num_steps > total:
            raise ModelError(f"--steps {cfg.num_steps} exceeds the {total} training timesteps of model "
                             f"{cfg.model!r}; pass --steps {total} or fewer")
        k = self.source.num_class_embeds
        self.conditional = bool(k)
        if self.conditional and k != NUM_CLASSES:
            raise ModelError(f"{self.source.unet_dir}: num_class_embeds={k}; a CIFAR-10 conditional "
                             f"UNet has {NUM_CLASSES} classes")
        self.labeler = open_labeler(cfg, self.conditional, self.device)
        self.model_sha256 = self.source.weights_sha256()
        self.labeler_sha256 = self.labeler.sha256 if self.labeler is not None else None

    def make_sampler(self) -> Any:
        import torch
        from diffusers.utils import logging as dlogging

        from cifar5m.generator.sampler import Sampler

        dlogging.set_verbosity_error()  # from_config warns about every DDPM-only key
        if self.device.type == "cuda":
            # Fixed shapes all run long: let cuDNN time its algorithms once per shape.
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")  # the fp32 labeler's matmuls on TF32
        unet = model_mod.load_unet(self.source)
        return Sampler(unet, self.source.scheduler_config, sampler=self.cfg.sampler,
                       steps=self.cfg.num_steps, device=self.device,
                       dtype=getattr(torch, DTYPES[self.dtype_name]), compile=bool(self.cfg.compile))

    def start_line(self, images: int) -> str:
        """What runs where, what the device chose, and the estimated time of ``images``."""
        from cifar5m.generator.cost import sampling_cost

        nfe, gflop, _ = sampling_cost(self.cfg, self.source)
        return defaults.start_line(self.cfg, self.device.type, self.chosen, images=images, nfe=nfe,
                                   gflop=gflop, threads=self.threads, gpus=self.rank.world)

    def produce(self, write: Callable[[ShardPlan, list], Any], todo: list[ShardPlan], *,
                progress: bool) -> None:
        """Sample ``todo``'s shards; ``write(plan, samples)`` runs in background threads."""
        if not todo:
            return
        import torch

        was = torch.get_num_threads()
        torch.set_num_threads(self.threads or was)  # fewer on a busy CPU (defaults.cpu_threads)
        try:
            if not self.cfg.exact_cpu:  # oneDNN: fast, but bits depend on the batch size
                self._produce(write, todo, progress=progress)
                return
            with cpu_determinism(self.device):
                self._produce(write, todo, progress=progress)
        finally:
            torch.set_num_threads(was)

    def _produce(self, write: Callable[[ShardPlan, list], Any], todo: list[ShardPlan], *,
                 progress: bool) -> None:
        from tqdm.auto import tqdm

        from cifar5m.generator.producer import Producer

        sampler = self.make_sampler()
        producer = Producer(sampler, self.labeler, seed=self.cfg.seed, batch_size=self.cfg.batch_size,
                            num_classes=NUM_CLASSES, conditional=self.conditional,
                            min_confidence=self.cfg.min_confidence, balance=self.cfg.balance)
        desc = f"generate (rank {self.rank.rank}/{self.rank.world})" if self.rank.world > 1 else "generate"
        # The bar counts image-steps (one UNet call on one image), shown as images: it moves
        # with every UNet call, so rate and ETA come within seconds. Filtered runs do not know
        # ahead how many candidates a shard needs: their bar moves per labelled chunk.
        nfe = sampler.nfe
        bar = tqdm(total=sum(p.size for p in todo) * nfe, unit="img", unit_scale=1 / nfe, desc=desc,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:,.0f}/{total:,.0f} {unit} "
                              "[{elapsed}<{remaining}, {rate_fmt}]",
                   dynamic_ncols=True, disable=not (progress and self.rank.is_main))
        producer.on_step = None if self.cfg.filtered else bar.update
        on_images = (lambda n: bar.update(n * nfe)) if self.cfg.filtered else None
        with ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="shard-writer") as pool:
            pending: deque = deque()
            for plan in todo:
                samples = producer.shard(plan, on_images=on_images)
                write_in_background(pool, pending, self.cfg.workers, write, plan, samples)
            while pending:
                pending.popleft().result()
        bar.close()

    def finish(self, root: Path, plan: list[ShardPlan], fp: dict[str, Any],
               records: dict[str, ShardRecord]) -> Manifest:
        """Index, card, config and manifest in ``root`` for the finished shards ``records``."""
        missing = [p.file for p in plan if p.file not in records or records[p.file].info.samples != p.size]
        if missing:
            raise GenerationError(
                f"{root}: shards {missing[:3]} are missing after all ranks finished; re-run the same "
                f"command to write them (ranks on several nodes need --out on a file system they all "
                f"see, or an fsspec URL such as s3://...)")
        ordered = [records[p.file] for p in plan]
        atomic_write_bytes(root / CONFIG_NAME, json.dumps(self.cfg.to_dict(), indent=1).encode())
        class_names = self.labeler.class_names if self.labeler is not None else CIFAR10_CLASSES
        return finalize(root, ordered, image_format=self.cfg.image_format,
                        class_names=class_names, provenance=self.provenance(fp, ordered))

    def provenance(self, fp: dict[str, Any], records: list[ShardRecord]) -> dict[str, Any]:
        import diffusers
        import torch

        from cifar5m.generator.sampler import build_scheduler

        cfg, src = self.cfg, self.source
        sched = build_scheduler(cfg.sampler, src.scheduler_config, cfg.num_steps)
        out: dict[str, Any] = {
            "source": "cifar5m generate", "model": src.name, "model_revision": src.revision,
            "model_sha256": self.model_sha256, "conditional": self.conditional,
            "sampler": cfg.sampler, "steps": cfg.num_steps,
            "timesteps": [int(t) for t in sched.timesteps], "seed": cfg.seed,
            "noise": fp["noise"], "labeler": cfg.labeler_path, "labeler_sha256": self.labeler_sha256,
            "min_confidence": cfg.min_confidence, "balance": cfg.balance, "count": cfg.count,
            "test_count": cfg.test_count, "dtype": self.dtype_name, "device_type": self.device.type,
            "compile": cfg.compile,
            "chosen_by_device": self.chosen,
            "sample_order": "test = samples [0, test_count), train = the rest; key s{noise id:010d}",
            "versions": {"cifar5m": __version__, "torch": torch.__version__,
                         "diffusers": diffusers.__version__},
            "fingerprint": fp,
        }
        if self.labeler is not None:  # model id, revision or hash, preprocessing
            out["labeler_details"] = self.labeler.details()
        if self.device.type == "cpu":
            out["cpu_kernels"] = "exact" if cfg.exact_cpu else "onednn"
        if self.conditional and self.labeler is not None:
            out["labeler_agreement"] = agreement(records)
        return out


@contextlib.contextmanager
def cpu_determinism(device: Any) -> Iterator[None]:
    """On CPU, run convolutions on the native path while generating and labelling.

    oneDNN and NNPACK (NNPACK from batch 16) choose conv kernels by batch size, which
    changes the last bits of a sample's output with the batch it is in; the native
    path computes each image alone, so CPU datasets are batch- and rank-invariant
    (checked on the ddpm-cifar10-32 UNet: batch 17 vs 5+5+5+2, 2 vs 1 threads). It is
    slower than oneDNN; CPUs are for tests and small sets anyway.
    """
    import torch

    if device.type != "cpu":
        yield
        return
    # (not mkldnn.flags(): it would also reset oneDNN's tf32/deterministic settings)
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with torch.backends.nnpack.flags(enabled=False):
            yield
    finally:
        torch.backends.mkldnn.enabled = was


def agreement(records: list[ShardRecord]) -> float:
    """Fraction of samples whose conditioned class is the labeler's top class (read shard by
    shard, two columns each: memory stays flat at millions of rows)."""
    match = total = 0
    for record in records:
        table = record.rows(["cond_label", "probs"])
        if not len(table):
            continue
        probs = np.asarray(table["probs"].combine_chunks().flatten(), dtype=np.float32)
        top = probs.reshape(len(table), -1).argmax(axis=1)
        match += int(np.sum(top == table["cond_label"].to_numpy(zero_copy_only=False)))
        total += len(table)
    return round(match / total, 6) if total else float("nan")
