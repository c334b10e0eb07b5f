"""Coordinate-wise median of the sites' updates (Yin et al., "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018): a robust rule.

Update rule, per coordinate::

    theta_next = theta + median_k delta_k

(unweighted: a site's example count cannot buy it more influence; with an even number of
sites, the mean of the two middle values). A minority of arbitrary updates moves each
coordinate at most to the range of the honest ones. It needs every site's update
(``needs = "each"``), so it cannot run under secure aggregation, which reveals only the sum.

Flower: ``flwr.serverapp.strategy.FedMedian`` takes the median of the sites' parameters
``theta_k = theta + delta_k``; the median commutes with the shift, so it is the same rule.
"""

from __future__ import annotations

import numpy as np

from .base import Combined, State, Strategy, StrategyState, apply, as_each


def coordinate_median(arrays: list[np.ndarray]) -> np.ndarray:
    """The median over the first axis of the stacked ``arrays`` (float64)."""
    return np.median(np.stack([np.asarray(a, dtype=np.float64) for a in arrays]), axis=0)


class CoordinateMedian(Strategy):
    name = "median"
    needs = "each"

    def weight(self, num_examples: float) -> float:
        """Unweighted: every site counts once."""
        super().weight(num_examples)  # still refuses a nonsensical count
        return 1.0

    def step(self, cohort: str, round_: int, global_state: State, combined: Combined,
             state: StrategyState) -> tuple[dict[str, np.ndarray], StrategyState]:
        updates = as_each(self.name, cohort, round_, global_state, combined)
        return apply(global_state, {k: coordinate_median([u.delta[k] for u in updates]) for k in global_state}), {}
