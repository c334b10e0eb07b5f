"""FedAvg over adapter updates (McMahan et al., AISTATS 2017).

Update rule, per array::

    theta_next = theta + eta * sum_k (n_k / N) * delta_k,      N = sum_k n_k

with server learning rate ``eta`` (1.0 gives plain FedAvg: the weighted mean of the sites'
adapters). Needs only the weighted mean (``needs = "sum"``), so it composes with secure
aggregation. The mean is summed in float64 over sites sorted by name, so the result does not
depend on the order in which replies arrive.

Flower: ``flwr.serverapp.strategy.FedAvg`` averages the sites' parameters ``theta_k`` with
weights ``n_k``; the same as ``theta + mean_k delta_k`` (eta = 1). Flower's FedAvg has no server
learning rate; eta != 1 is Flower's FedAvgM with ``server_momentum = 0``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import Combined, SiteUpdate, State, Strategy, StrategyState, apply, as_mean, real_option


def weighted_mean(updates: Sequence[SiteUpdate]) -> dict[str, np.ndarray]:
    """``sum_k w_k delta_k / sum_k w_k`` per array, ``w_k`` the updates' ``weight`` as given
    (float64 accumulation over sites sorted by name, float32 result)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    total = float(sum(u.weight for u in updates))
    if not total > 0:
        raise ValueError(f"the sum of weights must be positive, got {total}")
    ordered = sorted(updates, key=lambda u: u.site)
    keys = list(ordered[0].delta)
    out: dict[str, np.ndarray] = {}
    for k in keys:
        acc = np.zeros(np.shape(ordered[0].delta[k]), dtype=np.float64)
        for u in ordered:
            acc += (u.weight / total) * np.asarray(u.delta[k], dtype=np.float64)
        out[k] = acc.astype(np.float32)
    return out


class FedAvg(Strategy):
    """Example-weighted averaging of adapter updates, applied with server learning rate eta."""

    name = "fedavg"
    needs = "sum"

    def __init__(self, server_learning_rate: float = 1.0) -> None:
        self.server_learning_rate = real_option(self.name, "server_learning_rate", server_learning_rate, low=0.0, low_open=True)
        self.eta = self.server_learning_rate

    def step(self, cohort: str, round_: int, global_state: State, combined: Combined,
             state: StrategyState) -> tuple[dict[str, np.ndarray], StrategyState]:
        mean = as_mean(self.name, cohort, round_, global_state, combined)
        return apply(global_state, {k: self.eta * v for k, v in mean.items()}), {}
