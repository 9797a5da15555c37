"""Turn one shard's plan into its samples: sample, label, filter.

Candidates are processed in chunks of at most ``CHUNK`` consecutive ids, aligned to
the shard's first candidate; the labeler always sees exactly these chunks. Chunk
boundaries depend only on the plan and on earlier labels, never on the batch size,
so labels and probabilities are bit-identical on CPU for any ``--batch-size``
(a ``Linear`` layer's result can change in the last bit with its batch size).
"""

from __future__ import annotations

from typing import Any

import torch

from cifar5m.core.errors import GenerationError
from cifar5m.generator.plan import ShardPlan, key_of
from cifar5m.generator.sampler import Sampler
from cifar5m.shards.index import class_quotas
from cifar5m.shards.writer import Sample

CHUNK = 2048  # candidates per labeller call; also caps the sampler batch


class Producer:
    """Samples of a shard, from a ``Sampler`` and an optional labeler."""

    def __init__(self, sampler: Sampler, labeler: Any | None, *, seed: int, batch_size: int,
                 num_classes: int, conditional: bool, min_confidence: float = 0.0,
                 balance: bool = False) -> None:
        self.sampler, self.labeler = sampler, labeler
        self.seed, self.batch_size = seed, batch_size
        self.num_classes, self.conditional = num_classes, conditional
        self.min_confidence, self.balance = min_confidence, balance
        self.on_step: Any = None  # called with the batch size after every UNet call

    def images(self, ids: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images of ``ids``, sampled ``batch_size`` at a time."""
        parts = []
        for a in range(0, len(ids), self.batch_size):
            batch = ids[a : a + self.batch_size]
            cond = batch % self.num_classes if self.conditional else None
            parts.append(self.sampler.sample(self.seed, batch, class_labels=cond, on_step=self.on_step))
        return torch.cat(parts)

    def _chunk_size(self, plan: ShardPlan, pos: int, need: int) -> int:
        left = plan.candidates.stop - pos
        if plan.stride == 1:
            return min(CHUNK, left)
        # Filtering: ask for 25 % more than still needed (in multiples of 64) so the
        # tail of a shard does not sample a whole CHUNK for a few missing images.
        return min(CHUNK, left, max(64, -(-(need * 5 // 4) // 64) * 64))

    def shard(self, plan: ShardPlan, *, on_images: Any = None) -> list[Sample]:
        quotas = class_quotas(plan.size, self.num_classes) if self.balance else None
        kept: list[Sample] = []
        pos = plan.candidates.start
        while len(kept) < plan.size:
            if pos >= plan.candidates.stop:
                raise GenerationError(
                    f"shard {plan.file}: only {len(kept)} of {plan.size} samples passed "
                    f"--min-confidence {self.min_confidence} / --balance after {len(plan.candidates)} "
                    f"candidates; lower --min-confidence or drop --balance")
            n = self._chunk_size(plan, pos, plan.size - len(kept))
            ids = torch.arange(pos, pos + n, dtype=torch.int64)
            images = self.images(ids)
            probs = self.labeler.predict(images).cpu() if self.labeler is not None else None
            before = len(kept)
            self._select(ids, images, probs, kept, quotas, plan.size)
            pos += n
            if on_images is not None:
                on_images(len(kept) - before)
        return kept

    def _select(self, ids: torch.Tensor, images: torch.Tensor, probs: torch.Tensor | None,
                kept: list[Sample], quotas: list[int] | None, size: int) -> None:
        images_np = images.numpy()
        if probs is not None:
            labels = (ids % self.num_classes) if self.conditional else probs.argmax(dim=1)
            conf = probs.gather(1, labels[:, None])[:, 0]
        else:
            labels, conf = ids % self.num_classes, None
        # Python lists once per chunk: indexing tensors per sample made this loop 6.6 us
        # per sample against 2.6 now (4096 samples, 10 classes; ~24 s over 6M samples).
        labels_l, ids_l = labels.tolist(), ids.tolist()
        conf_l = [None] * len(ids_l) if conf is None else conf.tolist()
        probs_l = [None] * len(ids_l) if probs is None else probs.tolist()
        for j, (label, c, cand, p) in enumerate(zip(labels_l, conf_l, ids_l, probs_l, strict=True)):
            if c is not None and c < self.min_confidence:
                continue
            if quotas is not None:
                if quotas[label] == 0:
                    continue
                quotas[label] -= 1
            kept.append(Sample(key_of(cand), images_np[j], label, confidence=c, seed=cand,
                               cond_label=label if self.conditional else None, probs=p))
            if len(kept) == size:
                return
