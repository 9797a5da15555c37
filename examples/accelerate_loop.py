"""cifar5m with Hugging Face Accelerate: a DataLoader over SampleStream through
accelerator.prepare, either world.

    python examples/accelerate_loop.py --data data/cifar5m --world ideal --steps 2000
    accelerate launch --num_processes 4 examples/accelerate_loop.py --data data/cifar5m --world real --n 50000

The stream already gives each process its own slice of every global batch (its rank comes
from torch.distributed), so the loader is prepared with dispatch_batches=False and
split_batches=False: Accelerate moves the batches to the device and leaves the slicing to the
stream (ideal world: every sample at most once over all processes).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader

from cifar5m import SampleStream, StreamConfig


def to_input(batch):
    """Runs in the loader's worker: uint8 NCHW -> float in [-1, 1], and the labels."""
    return batch.images.float().div_(127.5).sub_(1), batch.labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--world", choices=["ideal", "real"], default="ideal")
    ap.add_argument("--n", type=int)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128, help="global, over all processes")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(dispatch_batches=False,
                                                                        split_batches=False))
    stream = SampleStream(StreamConfig(source=args.data, world=args.world, n=args.n,
                                       batch_size=args.batch_size, steps=args.steps), transform=to_input)
    loader = DataLoader(stream, batch_size=None, num_workers=args.workers)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    steps = 0
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        steps += 1
    accelerator.print(f"trained {steps} steps in the {args.world} world, last loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
