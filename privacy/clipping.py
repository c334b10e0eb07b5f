"""Client-level DP math on adapter updates (pure numpy): clip to a norm, add Gaussian noise.

* Clipping: ``clip(u) = u * min(1, C / ||u||_2)`` with the norm over *all* arrays of the
  update (float64). An update with ``||u|| <= C`` comes back bit-identical; an all-zero update
  is fine; a NaN or Inf anywhere is refused.
* Noise: the sum of clipped updates gets ``N(0, (z C)^2)`` per coordinate (Gaussian mechanism,
  sensitivity C). Added by the coordinator, or split across the n sites of a round, each
  adding ``N(0, (z C)^2 / n)`` so that the coordinator never holds an un-noised sum; the sum of
  the shares has exactly variance ``(z C)^2``. Noise is drawn in float64 and added before the
  result is cast back to float32, so no precision is lost to the update's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Update = Mapping[str, np.ndarray]


def global_norm(update: Update) -> float:
    """``sqrt(sum_k ||u_k||^2)`` over every array, in float64; refuses non-finite values."""
    total = 0.0
    for k, v in update.items():
        a = np.asarray(v, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"update array {k!r} holds NaN or Inf; refusing to clip it")
        total += float(np.dot(a.ravel(), a.ravel()))
    return math.sqrt(total)


def clip_update(update: Update, clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Returns (the clipped update, its norm before clipping)."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = global_norm(update)
    if norm <= clip_norm:
        return {k: np.array(v, copy=True) for k, v in update.items()}, norm
    scale = clip_norm / norm
    return {k: (np.asarray(v, dtype=np.float64) * scale).astype(np.asarray(v).dtype) for k, v in update.items()}, norm


def noise_std(noise_multiplier: float, clip_norm: float, shares: int = 1) -> float:
    """Per-coordinate std of one noise share: ``z C / sqrt(shares)``."""
    if noise_multiplier < 0 or clip_norm <= 0 or shares < 1:
        raise ValueError(f"need noise_multiplier >= 0, clip_norm > 0, shares >= 1; got {noise_multiplier}, {clip_norm}, {shares}")
    return noise_multiplier * clip_norm / math.sqrt(shares)


def add_gaussian_noise(values: Update, std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``v + N(0, std^2)`` per coordinate, drawn and added in float64, returned as float32.
    Arrays are noised in sorted key order (the draws do not depend on dict order)."""
    noised = {k: (np.asarray(values[k], dtype=np.float64) + rng.normal(0.0, std, size=np.shape(values[k]))).astype(np.float32)
              for k in sorted(values)}
    return {k: noised[k] for k in values}
