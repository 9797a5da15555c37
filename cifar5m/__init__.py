"""cifar5m: make, serve and use CIFAR-5m-scale synthetic datasets.

The stages live in top-level packages (``shards``, ``generator``, ``dataset_server``,
``train``); this package holds what they share: the CLI, the errors and the version, and
for the two stages that train models (generator, train) their checkpoints
(``cifar5m.core.checkpoint``) and which torchrun process this is (``cifar5m.core.ranks``).
"""

from cifar5m.core.version import __version__

__all__ = ["__version__"]
