"""Krum and multi-Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent", NeurIPS 2017): robust selection.

With ``n`` updates of which at most ``f`` may be byzantine, each update's score is the sum of
its squared distances to its ``n - f - 2`` nearest other updates::

    s(i) = sum_{j in N_i} ||delta_i - delta_j||^2,      |N_i| = max(1, n - f - 2)

Krum takes the update of lowest score; multi-Krum takes the ``m`` lowest and averages them with
the strategy's weights (the example counts ``n_k``, as Flower does; Blanchard et al. average them
uniformly)::

    theta_next = theta + sum_{i in S} n_i delta_i / sum_{i in S} n_i

Options: ``byzantine`` (f, 0 as in Flower) and, for multi-Krum, ``selected`` (m; 0 means
``n - f``, all but the possibly byzantine). The guarantee needs ``n > 2f + 2``; with fewer
updates the rule still runs (with at least one neighbour, as Flower does) and logs a warning.
Needs each site's update (``"each"``): refused under secure aggregation.

Flower: ``flwr.serverapp.strategy.Krum`` / ``MultiKrum`` score the sites' parameters
``theta_k = theta + delta_k``; distances are unchanged by the shift, so it is the same rule.
Ties in the score go to the site whose name sorts first (Flower: unstable argsort order).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from .base import Combined, SiteUpdate, State, Strategy, StrategyState, apply, as_each, int_option

log = logging.getLogger("fedlora.strategies")


def krum_scores(updates: Sequence[SiteUpdate], byzantine: int) -> np.ndarray:
    """Each update's Krum score (float64, in the order given)."""
    keys = sorted(updates[0].delta)
    flat = np.stack([np.concatenate([np.asarray(u.delta[k], dtype=np.float64).ravel() for k in keys]) for u in updates])
    norms = np.einsum("ij,ij->i", flat, flat)
    dist = np.maximum(norms[:, None] + norms[None, :] - 2.0 * (flat @ flat.T), 0.0)
    n = len(updates)
    closest = max(1, n - byzantine - 2)
    scores = np.zeros(n, dtype=np.float64)
    for i in range(n):
        others = np.delete(dist[i], i)
        scores[i] = np.sum(np.sort(others)[:closest]) if others.size else 0.0
    return scores


def krum_select(updates: Sequence[SiteUpdate], byzantine: int, selected: int) -> list[SiteUpdate]:
    """The ``selected`` updates of lowest Krum score (all of them if there are fewer), ties by site name."""
    ordered = sorted(updates, key=lambda u: u.site)
    scores = krum_scores(ordered, byzantine)
    best = np.argsort(scores, kind="stable")[:selected]
    return [ordered[i] for i in best]


class MultiKrum(Strategy):
    name = "multikrum"
    needs = "each"

    def __init__(self, *, byzantine: int = 0, selected: int = 0) -> None:
        self.byzantine = int_option(self.name, "byzantine", byzantine, low=0)
        self.selected = int_option(self.name, "selected", selected, low=0)

    def how_many(self, n: int) -> int:
        """How many of ``n`` updates are averaged."""
        return self.selected or max(1, n - self.byzantine)

    def step(self, cohort: str, round_: int, global_state: State, combined: Combined,
             state: StrategyState) -> tuple[dict[str, np.ndarray], StrategyState]:
        updates = as_each(self.name, cohort, round_, global_state, combined)
        if len(updates) <= 2 * self.byzantine + 2:
            log.warning("%s: %d updates for f = %d byzantine sites (cohort %r, round %d); Krum's guarantee needs more than %d",
                        self.name, len(updates), self.byzantine, cohort, round_, 2 * self.byzantine + 2)
        chosen = krum_select(updates, self.byzantine, self.how_many(len(updates)))
        weights = np.array([self.weight(u.weight) for u in chosen], dtype=np.float64)
        if not weights.sum() > 0:
            raise ValueError(f"{self.name}: the selected sites' weights sum to {weights.sum()}, must be positive")
        weights /= weights.sum()
        change = {k: sum(w * np.asarray(u.delta[k], dtype=np.float64) for w, u in zip(weights, chosen, strict=True))
                  for k in global_state}
        return apply(global_state, change), {}


class Krum(MultiKrum):
    name = "krum"

    def __init__(self, *, byzantine: int = 0) -> None:
        super().__init__(byzantine=byzantine, selected=1)
