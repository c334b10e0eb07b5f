"""Client-level DP for one cohort's round (pure numpy): DP-FedAvg and adaptive clipping.

Privacy unit: one whole site (all of its records). Each round, every site of the cohort is
sampled independently with probability ``q`` (Poisson); a sampled site's update ``u_i`` is
clipped to ``||u_i|| <= C``, and the released aggregate is

    Delta = (sum_i clip(u_i) + N(0, (z C)^2 I)) / (q n)

(McMahan et al., ICLR 2018, DP-FedAvg with a fixed denominator: the expected number of
sampled sites, so the denominator reveals nothing). Over rounds this is a composition of
Poisson-subsampled Gaussian mechanisms with (z, q): a ``ClientDpEvent`` per round.

The noise is added either by the coordinator (one draw) or by the m sampled sites, each
adding a share ``N(0, (z C)^2 / m)``; if only ``s < m`` of them deliver, the sum carries
less noise and the round's *effective* multiplier is ``z sqrt(s / m)`` (``effective_noise``),
which is what the ledger records.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021): each site also
reports ``b_i = 1[||u_i|| <= C]``; the coordinator releases ``b = (sum b_i + N(0, s_b^2)) / (q n)``
and sets ``C <- C exp(-eta (b - gamma))`` (geometric update towards the gamma-quantile of
the update norms). Releasing both sums is a Gaussian mechanism of multiplier ``z`` when the
update noise uses ``z_delta = (z^-2 - (2 s_b)^-2)^(-1/2)`` (their Theorem 1), which needs
``2 s_b > z``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .clipping import Update


def effective_noise(noise_multiplier: float, shares_expected: int, shares_delivered: int) -> float:
    """Multiplier of the noise a sum actually carries when ``delivered`` of ``expected``
    equal shares (each of variance ``(z C)^2 / expected``) arrived: ``z sqrt(delivered / expected)``."""
    if shares_expected < 1 or not 0 <= shares_delivered <= shares_expected:
        raise ValueError(f"need 0 <= delivered <= expected, expected >= 1; got {shares_delivered} of {shares_expected}")
    return noise_multiplier * math.sqrt(shares_delivered / shares_expected)


def update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """``z_delta`` for the updates when the clipped-count sum gets noise ``s_b`` (adaptive clipping),
    so that both releases together are a Gaussian mechanism of multiplier ``z``."""
    if count_noise_std <= 0:
        return noise_multiplier
    if 2 * count_noise_std <= noise_multiplier:
        raise ValueError(f"adaptive clipping needs count noise > z / 2: z = {noise_multiplier}, count noise = {count_noise_std}")
    return (noise_multiplier ** -2 - (2 * count_noise_std) ** -2) ** -0.5


def combined_noise_multiplier(update_multiplier: float, count_noise_std: float) -> float:
    """The single Gaussian multiplier equivalent to releasing the updates at ``z_delta`` and
    the count at ``s_b`` (inverse of ``update_noise_multiplier``): ``(z_d^-2 + (2 s_b)^-2)^(-1/2)``."""
    if update_multiplier <= 0:
        return 0.0
    if count_noise_std <= 0:
        return update_multiplier
    return (update_multiplier ** -2 + (2 * count_noise_std) ** -2) ** -0.5


def next_clip_norm(clip_norm: float, unclipped_fraction: float, target_quantile: float, learning_rate: float) -> float:
    """Geometric clip update ``C exp(-eta (b - gamma))``: C shrinks while more than a
    ``gamma`` fraction of updates fit under it and grows otherwise."""
    return float(clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile)))


def noisy_mean(clipped: Sequence[Update], shapes: Mapping[str, tuple[int, ...]], std: float, denominator: float,
               rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """``(sum clipped + N(0, std^2)) / denominator`` in float64, returned as float32.
    ``rng`` None adds no noise here (the sites added their shares already). Noise is drawn
    array by array in sorted key order, so the result does not depend on dict order."""
    if denominator <= 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")
    total = {k: np.zeros(s, dtype=np.float64) for k, s in shapes.items()}
    for u in clipped:
        for k in total:
            total[k] += np.asarray(u[k], dtype=np.float64)
    if rng is not None and std > 0:
        for k in sorted(total):  # a fixed draw order, whatever the mapping's order
            total[k] = total[k] + rng.normal(0.0, std, size=total[k].shape)
    return {k: (v / denominator).astype(np.float32) for k, v in total.items()}


def noisy_count(bits: Sequence[int], std: float, denominator: float, rng: np.random.Generator) -> float:
    """``(sum b_i + N(0, std^2)) / denominator``: the released fraction of unclipped updates."""
    return float((sum(int(b) for b in bits) + (rng.normal(0.0, std) if std > 0 else 0.0)) / denominator)

