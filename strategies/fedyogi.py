"""FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): Yogi on the server.

Update rule (see ``fedopt`` for ``Delta_t``, ``m_t`` and the step)::

    v_t = v_{t-1} - (1 - beta_2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)
    theta_next = theta + eta * m_t / (sqrt(v_t) + tau)

``v`` grows at most additively (unlike Adam's multiplicative decay), which keeps the effective
learning rate from jumping when updates shrink. Options: ``eta`` (1e-2), ``beta_1`` (0.9),
``beta_2`` (0.99), ``tau`` (1e-3), Flower's defaults. Needs only the mean (``"sum"``). Matches
``flwr.serverapp.strategy.FedYogi`` (no bias correction in either).
"""

from __future__ import annotations

import numpy as np

from .fedopt import FedOpt


class FedYogi(FedOpt):
    name = "fedyogi"

    def __init__(self, *, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        d2 = delta**2
        return v - (1.0 - self.beta_2) * d2 * np.sign(v - d2)
