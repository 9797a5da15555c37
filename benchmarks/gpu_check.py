"""Every GPU measurement of the project, as one prepared script for a lent H100/H200.

    python benchmarks/gpu_check.py [--only generate,models,train] [--out DIR]

Runs, in order, each area's `main()`: `gpu_generate.py` (end-to-end generation vs
DDPMPipeline fp16), `gpu_models.py` (labeler and small generator training, writes the
builtin models) and `gpu_train.py` (ResNet-18 training fed from shards vs compute-only).
Each prints its own table; this script adds the card name and the wall time of each part,
and keeps going when one part fails so one bad part does not waste the lease.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = {"generate": "gpu_generate.py", "models": "gpu_models.py", "train": "gpu_train.py"}


def run_part(name: str, argv: list[str]) -> tuple[str, float]:
    path = HERE / PARTS[name]
    if not path.is_file():
        return "missing", 0.0
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", path)
    module = importlib.util.module_from_spec(spec)
    start = time.perf_counter()
    try:
        spec.loader.exec_module(module)
        if inspect.signature(module.main).parameters:
            module.main(argv)
        else:  # an argparse main() without parameters reads sys.argv
            saved, sys.argv = sys.argv, [str(path), *argv]
            try:
                module.main()
            finally:
                sys.argv = saved
        return "ok", time.perf_counter() - start
    except Exception:  # report and move on: the lease is short
        traceback.print_exc()
        return "failed", time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS))
    parser.add_argument("--out", default="gpu-output")
    args = parser.parse_args()
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"card: {card}, torch {torch.__version__}")
    results = {name: run_part(name, ["--out", args.out]) for name in args.only.split(",")}
    print(f"\n{'part':<10} {'status':<8} {'seconds':>8}   card: {card}")
    for name, (status, seconds) in results.items():
        print(f"{name:<10} {status:<8} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
