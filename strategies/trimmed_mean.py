"""Coordinate-wise trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018): a robust rule.

Update rule, per coordinate, with ``n`` updates and ``c = floor(beta * n)``::

    theta_next = theta + mean( sorted_k(delta_k)[c : n - c] )

i.e. the ``c`` largest and ``c`` smallest values of each coordinate are dropped and the rest
averaged, unweighted. Option ``beta`` in [0, 0.5): the fraction cut at each end (0.2, Flower's
default; 0 is the plain mean). Needs each site's update (``"each"``): refused under secure aggregation.

Flower: ``flwr.serverapp.strategy.FedTrimmedAvg`` (scipy's ``trim_mean``) over the sites'
parameters; trimming commutes with the shift ``theta_k = theta + delta_k``, so it is the same
rule. We sort each coordinate fully before averaging, so the result does not depend on the
order of the replies.
"""

from __future__ import annotations

import numpy as np

from .base import Combined, State, Strategy, StrategyState, apply, as_each, real_option


def trimmed_mean(arrays: list[np.ndarray], beta: float) -> np.ndarray:
    """Mean over the first axis after dropping ``floor(beta * n)`` values at each end, per coordinate (float64)."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"the trimmed fraction beta must be in [0, 0.5), got {beta}")
    stacked = np.sort(np.stack([np.asarray(a, dtype=np.float64) for a in arrays]), axis=0)
    cut = int(beta * stacked.shape[0])
    return np.mean(stacked[cut:stacked.shape[0] - cut], axis=0)


class TrimmedMean(Strategy):
    name = "trimmed_mean"
    needs = "each"

    def __init__(self, *, beta: float = 0.2) -> None:
        self.beta = real_option(self.name, "beta", beta, low=0.0, high=0.5, high_open=True)

    def weight(self, num_examples: float) -> float:
        """Unweighted: every site counts once."""
        super().weight(num_examples)
        return 1.0

    def step(self, cohort: str, round_: int, global_state: State, combined: Combined,
             state: StrategyState) -> tuple[dict[str, np.ndarray], StrategyState]:
        updates = as_each(self.name, cohort, round_, global_state, combined)
        return apply(global_state, {k: trimmed_mean([u.delta[k] for u in updates], self.beta) for k in global_state}), {}
