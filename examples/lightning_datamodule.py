"""cifar5m in PyTorch Lightning: a LightningDataModule whose train_dataloader() is a DataLoader
over SampleStream, either world.

    python examples/lightning_datamodule.py --data data/cifar5m --world ideal --max-steps 2000
    python examples/lightning_datamodule.py --data data/cifar5m --world real --n 50000 --max-steps 2000

The stream plans exactly max_steps global batches; Lightning's DDP launches one process per
device and the stream takes its rank from torch.distributed, so every rank gets its slice of
the same global batches (ideal world: every sample at most once).
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cifar5m import SampleStream, StreamConfig


def to_input(batch):
    """Runs in the loader's worker: uint8 NCHW -> float in [-1, 1], and the labels."""
    return batch.images.float().div_(127.5).sub_(1), batch.labels


class Cifar5mData(L.LightningDataModule):
    def __init__(self, data: str, *, world: str, n: int | None, batch_size: int, steps: int,
                 workers: int) -> None:
        super().__init__()
        self.data, self.world, self.n, self.batch_size, self.steps = data, world, n, batch_size, steps
        self.workers = workers

    def train_dataloader(self) -> DataLoader:
        # Made here, after Lightning has set up the process group: the stream reads its rank.
        stream = SampleStream(StreamConfig(source=self.data, world=self.world, n=self.n,
                                           batch_size=self.batch_size, steps=self.steps),
                              transform=to_input)
        return DataLoader(stream, batch_size=None, num_workers=self.workers,
                          persistent_workers=self.workers > 0)


class Classifier(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 512), nn.ReLU(), nn.Linear(512, 10))

    def training_step(self, batch, _index):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--world", choices=["ideal", "real"], default="ideal")
    ap.add_argument("--n", type=int)
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128, help="global, over all devices")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
    data = Cifar5mData(args.data, world=args.world, n=args.n, batch_size=args.batch_size,
                       steps=args.max_steps, workers=args.workers)
    trainer = L.Trainer(max_steps=args.max_steps, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(Classifier(args.lr), datamodule=data)
    print(f"trained {trainer.global_step} steps in the {args.world} world")


if __name__ == "__main__":
    main()
