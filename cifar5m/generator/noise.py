"""Per-sample Gaussian noise that depends only on (run seed, sample id, stream).

A counter-based generator (in the spirit of Philox, Salmon et al. 2011): every
element's bits are a hash of (seed, id, stream, element index), computed with
int64 tensor ops on whatever device the sampler runs. So sample ``i`` gets the
same starting noise (stream 0) and the same DDPM step noise (stream 1 + step)
whatever the batch size, rank, device or restart; no generator state to carry.

The hash is Wellons' ``lowbias32`` mixer on 32-bit words held in int64 tensors
(products split in 16-bit halves so nothing overflows int64). The uniform bits
are exact on every device; the Box-Muller floats (log, cos) may differ by an ulp
between CPU and CUDA kernels.
"""

from __future__ import annotations

import math

import torch

from cifar5m.core.errors import ModelError

_MASK32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x846CA68B  # lowbias32 multipliers
_SEED_SALT = 0x9E3779B9  # golden-ratio constant: keeps seed 0 from hashing zeros
_TWO_PI = 2 * math.pi


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def check_ids(ids: torch.Tensor) -> None:
    """Refuse negative sample ids. Reads the values: call it on CPU tensors (on CUDA it
    would wait for the device, once per call, i.e. per sampling step)."""
    if ids.numel() and int(ids.min()) < 0:
        raise ModelError(f"sample ids must be non-negative; got {int(ids.min())}")


def sample_keys(seed: int, ids: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent 32-bit keys per sample, shape (B,), int64 on ``ids.device``.

    Ids on the CPU are checked; device ids are not (the check would sync): check them
    before moving them, as ``Sampler.sample`` does.
    """
    if not 0 <= seed < 2**63 or not 0 <= stream < 2**32:
        raise ModelError(f"noise seed must be in [0, 2**63) and stream in [0, 2**32); got {seed}, {stream}")
    ids = ids.to(torch.int64)
    if ids.device.type == "cpu":
        check_ids(ids)
    words = (seed & _MASK32, seed >> 32)
    k = torch.full_like(ids, _SEED_SALT)
    for w in words:
        k = _mix(k ^ w)
    k = _mix(k ^ (ids & _MASK32))
    k = _mix(k ^ (ids >> 32))
    k_a = _mix(k ^ stream)
    # Second key from a different chain, so two samples whose first keys differ by a
    # small xor (making one's stream a permutation of the other's) stay independent.
    k_b = _mix(_mix(k_a ^ 0x68E31DA4) ^ (stream + 0x1B56C4E9))
    return k_a, k_b


def uniform_bits(seed: int, ids: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """(B, n) int64 hash words in [0, 2**32)."""
    k_a, k_b = sample_keys(seed, ids, stream)
    counter = torch.arange(n, dtype=torch.int64, device=ids.device)
    return _mix(_mix(k_a[:, None] ^ counter[None, :]) ^ k_b[:, None])


def normal(seed: int, ids: torch.Tensor, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal float32 noise of shape (B, *shape) for samples ``ids`` (Box-Muller)."""
    n = math.prod(shape)
    half = (n + 1) // 2
    bits = uniform_bits(seed, ids, stream, 2 * half)
    # 24 bits per uniform: exact in float32; +0.5 keeps u1 in (0, 1) so log is finite
    # (largest |z| = sqrt(-2 ln 2**-25) = 5.9 sigma).
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)
    u1, u2 = u[:, :half], u[:, half:]
    r = torch.sqrt(-2.0 * torch.log(u1))
    z = torch.cat([r * torch.cos(_TWO_PI * u2), r * torch.sin(_TWO_PI * u2)], dim=1)
    return z[:, :n].reshape(len(ids), *shape)
