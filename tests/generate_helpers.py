"""Tiny models for the generator tests: a random UNet2DModel and a random labeler."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def save_tiny_unet(path: Path, *, num_class_embeds: int | None = None, sample_size: int = 32,
                   seed: int = 0) -> Path:
    """A ~20k-parameter UNet2DModel + DDPMScheduler config (the DDPM CIFAR-10 schedule)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
        num_class_embeds=num_class_embeds)
    unet.save_pretrained(path)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  variance_type="fixed_large", clip_sample=True).save_pretrained(path)
    return path


def save_tiny_labeler(path: Path, *, num_classes: int = 10, seed: int = 0) -> Path:
    from cifar5m.generator.labeler import TinyNet, save_labeler

    torch.manual_seed(seed)
    net = TinyNet(width=4, num_classes=num_classes)
    names = [f"class{i}" for i in range(num_classes)]
    if num_classes == 10:
        from cifar5m.shards.format import CIFAR10_CLASSES

        names = list(CIFAR10_CLASSES)
    return save_labeler(net, path, arch="tiny", arch_kwargs={"width": 4, "num_classes": num_classes},
                        class_names=names)


def dataset_digest(root: Path) -> dict[str, str]:
    """sha256 of every file of a dataset except the run's own config (batch size etc.)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).iterdir()) if p.is_file() and p.name != "generate_config.json"}


def ranks_worker(rank_id: int, world: int, port: int, out_dir: str) -> None:
    """One process of a gloo group: what ``cifar5m.generator.rendezvous`` shares and reports (rank 1 fails)."""
    import json
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from cifar5m.generator import rendezvous

    rank = rendezvous.Rank(rank_id, world, rank_id)
    rendezvous.init(rank)
    try:
        got = rendezvous.share(rank, {"kept": ["test-000000.tar"]} if rank.is_main else None)
        failed = rendezvous.failed_ranks(rank, rank_id != 1)
        (Path(out_dir) / f"{rank_id}.json").write_text(json.dumps([got, failed]))
    finally:
        rendezvous.close(rank)
