"""The real world's subset is a uniform draw: its classes and positions spread like one.

The subset is ``choose_subset``: N positions drawn without replacement, uniformly, by
``np.random.default_rng([seed, 0, 2])`` (sorted), however they are fetched (the stream
asks for them in multi-range requests). Checked here on a split sorted by class (as an
imported CIFAR-10 is before shuffling), for several seeds; the draws are seeded, so the
test is deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from cifar5m.train.order import choose_subset

POOL, N, CLASSES, SHARD = 200_000, 20_000, 10, 2_000


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_subset_classes_and_positions_match_a_uniform_draw(seed):
    labels = np.repeat(np.arange(CLASSES), POOL // CLASSES)  # sorted by class: the hard case
    subset = choose_subset(labels, N, seed=seed, class_balanced=False, num_classes=CLASSES, where="x")
    assert len(np.unique(subset)) == N and np.all(np.diff(subset) > 0)
    assert np.array_equal(subset, choose_subset(labels, N, seed=seed, class_balanced=False,
                                                num_classes=CLASSES, where="x"))  # reproducible
    counts = np.bincount(labels[subset], minlength=CLASSES)
    assert stats.chisquare(counts).pvalue > 1e-3  # classes as often as in the pool
    assert stats.kstest(subset / POOL, "uniform").pvalue > 1e-3  # positions spread evenly
    per_shard = np.bincount(subset // SHARD, minlength=POOL // SHARD)
    assert stats.chisquare(per_shard).pvalue > 1e-3  # no shard favoured
    gaps = np.diff(subset)  # no clumping: gaps of a uniform draw are ~geometric(N / POOL)
    k = np.arange(1, 100)
    ecdf = np.searchsorted(np.sort(gaps), k, side="right") / len(gaps)
    assert np.abs(ecdf - stats.geom(N / POOL).cdf(k)).max() < 0.02
