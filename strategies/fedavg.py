"""FedAvg over adapter updates (McMahan et al., AISTATS 2017).

Update rule, per array::

    theta_next = theta + eta * sum_k (n_k / N) * delta_k,      N = sum_k n_k

with server learning rate ``eta`` (1.0 gives plain FedAvg: the weighted mean of the sites'
adapters). Sums run in float64, over sites sorted by name, so the result does not depend on
the order in which replies arrive. Linear in the updates, so it composes with secure
aggregation (only ``sum_k n_k delta_k`` and ``N`` are needed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import SiteUpdate, State, Strategy


def weighted_mean(updates: Sequence[SiteUpdate]) -> dict[str, np.ndarray]:
    """``sum_k n_k delta_k / sum_k n_k`` per array (float64 accumulation, float32 result)."""
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
    linear = True

    def __init__(self, server_learning_rate: float = 1.0) -> None:
        if not server_learning_rate > 0:
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate}")
        self.eta = float(server_learning_rate)

    def aggregate(self, global_state: State, updates: Sequence[SiteUpdate]) -> dict[str, np.ndarray]:
        mean = weighted_mean(updates)
        return {k: (np.asarray(v, dtype=np.float64) + self.eta * mean[k]).astype(np.float32) for k, v in global_state.items()}
