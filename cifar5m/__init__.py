"""cifar5m: make, serve and use CIFAR-5m-scale synthetic datasets.

The stages are subpackages (``cifar5m.generator``, ``cifar5m.shards``,
``cifar5m.dataset_server``, ``cifar5m.train``) over a small core (``cifar5m.core``:
errors, version, checkpoints, ranks); the ``cifar5m`` command is ``cifar5m.cli``.

The public names below are imported on first use, so ``import cifar5m`` (and
``cifar5m serve``) imports no torch::

    from cifar5m import SampleStream, StreamConfig, Dataset
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cifar5m.core.version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "SampleStream": "cifar5m.train.stream",
    "StreamConfig": "cifar5m.train.stream",
    "StreamBatch": "cifar5m.train.batch_producer",
    "Dataset": "cifar5m.shards.reader",
    "Split": "cifar5m.shards.reader",
    "Batch": "cifar5m.shards.reader",
    "Sample": "cifar5m.shards.shard",
    "DatasetWriter": "cifar5m.shards.writer",
    "write_synthetic_dataset": "cifar5m.shards.synthetic",
    "load_labeler": "cifar5m.generator.labeler",
    "save_labeler": "cifar5m.generator.labeler",
    "GenerateConfig": "cifar5m.generator.config",
    "TrainConfig": "cifar5m.train.config",
}

__all__ = ["__version__", *_PUBLIC]

if TYPE_CHECKING:
    from cifar5m.generator.config import GenerateConfig
    from cifar5m.generator.labeler import load_labeler, save_labeler
    from cifar5m.shards.reader import Batch, Dataset, Split
    from cifar5m.shards.shard import Sample
    from cifar5m.shards.synthetic import write_synthetic_dataset
    from cifar5m.shards.writer import DatasetWriter
    from cifar5m.train.batch_producer import StreamBatch
    from cifar5m.train.config import TrainConfig
    from cifar5m.train.stream import SampleStream, StreamConfig


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'cifar5m' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
