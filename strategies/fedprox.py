"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

Each site minimises its loss plus a proximal term that keeps it near the global adapter::

    min_w  F_k(w) + (mu / 2) * ||w - w_global||^2,     gradient term:  mu * (w - w_global)

The server side is FedAvg (``theta_next = theta + eta * sum_k (n_k / N) delta_k``; ``"sum"``, so it
composes with secure aggregation). ``mu`` is the sites' business: ``site_options()`` carries it
to the trainer, which adds ``proximal_gradient(w, w_global, mu)`` to each trainable parameter's
gradient (or ``proximal_penalty`` to its loss). ``mu = 0`` is FedAvg.

Flower: ``flwr.serverapp.strategy.FedProx`` is FedAvg on the server and sends ``proximal-mu`` in
the train config; its client example adds ``(mu / 2) * ||w - w_global||`` (the norm, not its
square) to the loss. We use the paper's squared norm, whose gradient is ``mu * (w - w_global)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import real_option
from .fedavg import FedAvg


def proximal_gradient(w: Any, w_global: Any, mu: float) -> Any:
    """``mu * (w - w_global)``: the proximal term's gradient for one parameter. Works on any
    array type with ``-`` and ``*`` (numpy arrays, torch tensors); ``w_global`` is held fixed."""
    return mu * (w - w_global)


def proximal_penalty(w: Mapping[str, np.ndarray], w_global: Mapping[str, np.ndarray], mu: float) -> float:
    """``(mu / 2) * sum_k ||w_k - w_global_k||^2`` over the trainable arrays (float64)."""
    return 0.5 * mu * float(sum(np.sum((np.asarray(w[k], np.float64) - np.asarray(w_global[k], np.float64)) ** 2) for k in w_global))


class FedProx(FedAvg):
    name = "fedprox"
    needs = "sum"

    def __init__(self, *, mu: float = 0.01, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate)
        self.mu = real_option(self.name, "mu", mu, low=0.0)

    def site_options(self) -> dict[str, float]:
        return {"proximal_mu": self.mu}
