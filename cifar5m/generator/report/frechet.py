"""Frechet distance between two Gaussians fitted to feature sets.

d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the formula behind FID.

tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2), which needs only
``eigh`` and avoids scipy's general ``sqrtm`` and its complex round-off.

Computed in a labeler's feature space this is NOT comparable to published FID
numbers (those use Inception-v3 pool3 features and 50k samples).
"""

from __future__ import annotations

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need an (N, D) feature array with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"shape mismatch: means {mu1.shape} vs {mu2.shape}, covariances {s1.shape} vs {s2.shape}")
    r1 = _sqrt_psd(s1)
    middle = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = np.sqrt(np.clip(middle, 0, None)).sum()
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean))


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between two (N, D) feature sets."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))
