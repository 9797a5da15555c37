"""A training script of your own, fed by cifar5m: the same loop in either world.

    python examples/train_stream.py --data data/cifar5m --world ideal --steps 2000
    python examples/train_stream.py --data data/cifar5m --world real --n 50000 --steps 2000
    python examples/train_stream.py --data http://127.0.0.1:8000/datasets/lab/cifar5m/resolve/main
    torchrun --nproc-per-node 4 examples/train_stream.py --data data/cifar5m --arch preresnet18

``--data`` is a dataset directory or URL (`cifar5m serve`, any static server, s3://). The
ideal world hands out every sample at most once; the real world reuses a fixed, seeded subset
of N. Kill it and run the same command again: it resumes from checkpoint.pt exactly where it
stopped (the stream's ``state_dict`` is the number of global batches consumed, so it also
resumes under another number of torchrun processes).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cifar5m import SampleStream, StreamConfig


def make_model(arch: str) -> nn.Module:
    if arch == "mlp":  # 3x32x32 -> 512 -> 10: trains in seconds on a CPU
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 512), nn.ReLU(), nn.Linear(512, 10))
    from cifar5m.train.models import build_model  # preresnet18, vgg11_bn, vit, mcnn, mlp[w,...]

    return build_model(arch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--world", choices=["ideal", "real"], default="ideal")
    ap.add_argument("--n", type=int, help="real world: samples reused")
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128, help="global, over all processes")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", default="run")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--stop-after", type=int, help="stop after this many steps of this run")
    args = ap.parse_args()

    if "RANK" in os.environ:  # under torchrun: one process per GPU (or CPU slot)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)  # the same initial weights on every process
    model = make_model(args.arch).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    # Each process gets its slice of every global batch; rank and world size come from torchrun.
    stream = SampleStream(StreamConfig(source=args.data, world=args.world, n=args.n,
                                       batch_size=args.batch_size, steps=args.steps, seed=0,
                                       pin_memory=device.type == "cuda"))
    ckpt = Path(args.out) / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        stream.load_state_dict(state["stream"])
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model)

    def save() -> None:
        if rank == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            core = model.module if dist.is_initialized() else model
            torch.save({"model": core.state_dict(), "opt": opt.state_dict(), "stream": stream.state_dict()},
                       ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)  # a kill never leaves half a checkpoint

    for done, batch in enumerate(stream, start=1):
        x = batch.images.to(device, non_blocking=True).float().div_(127.5).sub_(1)  # [-1, 1]
        loss = F.cross_entropy(model(x), batch.labels.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {batch.step + 1}/{args.steps} loss {loss.item():.4f}", flush=True)
        if (batch.step + 1) % args.save_every == 0 or done == args.stop_after:
            save()
        if done == args.stop_after:
            break
    else:
        save()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
