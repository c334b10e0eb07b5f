"""Client-level DP for one cohort's round (pure numpy): DP-FedAvg and adaptive clipping.

Privacy unit: one whole site (all of its records). Each round the coordinator picks the sites
of a cohort (each independently with probability ``q``), and a picked site's update ``u_i`` is
clipped to ``||u_i|| <= C``; the released aggregate is

    Delta = (sum_i clip(u_i) + N(0, (z C)^2 I)) / (q n)

(McMahan et al., ICLR 2018, DP-FedAvg with a fixed denominator: the expected number of
sampled sites, so the released mean is unbiased and the denominator reveals nothing).

Accounting. The coordinator draws the sample with its own randomness and sees who answers,
and the coordinator is the party the sites protect their data from (threat model): the sample
is not secret from it, so **no amplification by subsampling** is claimed. Each round is one
Gaussian mechanism of multiplier ``z`` at sample rate 1, under *zero-out* adjacency (the site
list is public; neighbouring federations differ in one site's contribution being replaced by
zeros), where the sum of clipped updates has L2 sensitivity ``C``: a ``ClientDpEvent`` per round.

The noise is added either by the coordinator (one draw) or by the m sampled sites, each
adding a share ``N(0, (z C)^2 / m)``; if only ``s < m`` of them deliver, the sum carries
less noise and the round's *effective* multiplier is ``z sqrt(s / m)`` (``effective_noise``),
which is what the ledger records.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, Algorithm 1 and Thm 1):
each site also reports the bit ``b_i = 1[||u_i|| <= C]``. The bits are *centred* where the sum
is noised: with ``m`` contributions (counted by the coordinator, or the secure sum's site count)
``sum_i (b_i - 1/2) = sum_i b_i - m / 2``, each centred term lies in ``{-1/2, +1/2}`` and a
zeroed-out site contributes 0, so the sum has sensitivity ``1/2`` (the raw sum of bits has
sensitivity 1). The release is

    b = (sum_i (b_i - 1/2) + N(0, s_b^2)) / (q n) + 1/2

(unbiased: ``E[m] = q n``), and ``C <- C exp(-eta (b - gamma))`` moves C geometrically towards
the gamma-quantile of the update norms. Releasing the updates at ``z_delta`` (sensitivity
``C``) and the centred count at ``s_b`` (sensitivity 1/2) is, in Renyi DP at every order, one
Gaussian mechanism of multiplier ``z = (z_delta^-2 + (2 s_b)^-2)^(-1/2)``; inverted,
``z_delta = (z^-2 - (2 s_b)^-2)^(-1/2)``, which needs ``2 s_b > z``.
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
    """``z_delta = (z^-2 - (2 s_b)^-2)^(-1/2)`` for the updates when the centred count (sensitivity
    1/2) gets noise ``s_b`` (adaptive clipping), so that both releases together are one Gaussian
    mechanism of multiplier ``z``. ``s_b <= 0``: no count is released, ``z_delta = z``."""
    if count_noise_std <= 0:
        return noise_multiplier
    if 2 * count_noise_std <= noise_multiplier:
        raise ValueError(f"adaptive clipping needs count noise > z / 2: z = {noise_multiplier}, count noise = {count_noise_std}")
    return (noise_multiplier ** -2 - (2 * count_noise_std) ** -2) ** -0.5


def combined_noise_multiplier(update_multiplier: float, count_noise_std: float) -> float:
    """The single Gaussian multiplier equivalent to releasing the updates at ``z_delta``
    (sensitivity C) and the centred count at ``s_b`` (sensitivity 1/2): ``(z_d^-2 + (2 s_b)^-2)^(-1/2)``
    (inverse of ``update_noise_multiplier``; RDP of the pair is ``alpha (z_d^-2 + (2 s_b)^-2) / 2``)."""
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


def noisy_fraction(unclipped: int, contributions: int, std: float, denominator: float, rng: np.random.Generator | None) -> float:
    """The released fraction of unclipped updates from ``unclipped = sum_i b_i`` over
    ``contributions = m`` sites: ``(unclipped - m/2 + N(0, std^2)) / denominator + 1/2``.

    The centring makes each site's term ``b_i - 1/2``, so one site moves the noised sum by at
    most 1/2 (the sensitivity adaptive clipping's budget split assumes). ``rng`` None or
    ``std <= 0`` adds no noise. Counts outside ``0 <= unclipped <= contributions`` are refused."""
    if denominator <= 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")
    if not 0 <= int(unclipped) <= int(contributions):
        raise ValueError(f"the count of unclipped updates must lie in [0, {contributions}] (the sites in the sum), "
                         f"got {unclipped}")
    noise = rng.normal(0.0, std) if rng is not None and std > 0 else 0.0
    return float((int(unclipped) - int(contributions) / 2.0 + noise) / denominator + 0.5)


def noisy_count(bits: Sequence[int], std: float, denominator: float, rng: np.random.Generator | None) -> float:
    """``noisy_fraction`` of one bit per contribution (each 0 or 1): ``(sum (b_i - 1/2) +
    N(0, std^2)) / denominator + 1/2``."""
    values = [int(b) for b in bits]
    if any(b not in (0, 1) for b in values):
        raise ValueError(f"unclipped bits must be 0 or 1, got {sorted(set(values) - {0, 1})}")
    return noisy_fraction(sum(values), len(values), std, denominator, rng)
