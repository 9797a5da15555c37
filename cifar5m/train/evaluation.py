"""What a run evaluates on: its test split, CIFAR-10's test set and (real world) its N
training samples, each rank holding every world_size-th sample on its device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cifar5m.core.errors import TrainConfigError
from cifar5m.shards.reader import Dataset
from cifar5m.train.batches import TrainData
from cifar5m.train.config import TrainConfig
from cifar5m.train.device_augment import prepare
from cifar5m.train.distributed import Runtime
from cifar5m.train.metrics import evaluate


@dataclass
class EvalSet:
    name: str
    images: torch.Tensor  # this rank's slice, uint8 NCHW on the device
    labels: torch.Tensor


def load_eval_set(source: str, split: str, *, limit: int | None, rt: Runtime,
                  storage_options: dict | None = None) -> EvalSet:
    """The first ``limit`` samples of a split; each rank keeps every world_size-th one."""
    _, images, labels = Dataset(source, storage_options=storage_options).split(split).load(limit=limit)
    if not len(labels):
        raise TrainConfigError(f"{source} split {split!r} is empty; evaluate on another split")
    x = images.transpose(0, 3, 1, 2)[rt.rank :: rt.world_size]
    y = labels[rt.rank :: rt.world_size]
    return EvalSet(split, torch.from_numpy(np.ascontiguousarray(x)).to(rt.device),
                   torch.from_numpy(y).to(rt.device))


class Evaluator:
    """Computes a log row's metrics: test split, CIFAR-10 test, real-world train set."""

    def __init__(self, sets: dict[str, EvalSet], config: TrainConfig, rt: Runtime) -> None:
        self.sets, self.config, self.rt = sets, config, rt

    @classmethod
    def build(cls, config: TrainConfig, rt: Runtime, data: TrainData) -> Evaluator:
        sets = {"test": load_eval_set(config.data, config.test_split, limit=config.test_limit, rt=rt,
                                      storage_options=config.storage_options)}
        if config.cifar10_test:
            sets["cifar10"] = load_eval_set(config.cifar10_test, "test", limit=None, rt=rt)
        if data.real:
            stop = config.train_eval_limit or len(data.labels)
            sets["train"] = EvalSet("train", data.images[:stop][rt.rank :: rt.world_size],
                                    data.labels[:stop][rt.rank :: rt.world_size])
        return cls(sets, config, rt)

    def run(self, model: nn.Module) -> dict[str, float]:
        row = {}
        cl = self.config.channels_last
        for name, s in self.sets.items():
            metrics = evaluate(model, s.images, s.labels, batch_size=self.config.eval_batch_size,
                               prepare=lambda x, cl=cl: prepare(x, channels_last=cl),
                               autocast=lambda: self.rt.autocast(self.config.precision),
                               reduce=self.rt.reduce)
            row.update({f"{name}_{k}": v for k, v in metrics.items()})
        return row
