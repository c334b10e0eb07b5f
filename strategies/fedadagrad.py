"""FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): Adagrad on the server.

Update rule (see ``fedopt`` for ``Delta_t``, ``m_t`` and the step)::

    v_t = v_{t-1} + Delta_t^2
    theta_next = theta + eta * m_t / (sqrt(v_t) + tau)

Options: ``eta`` (0.1), ``beta_1`` (0.0: ``m_t = Delta_t``, as Flower fixes it; the paper's
Algorithm 2 allows momentum here too), ``tau`` (1e-3). No ``beta_2``. Needs only the mean
(``"sum"``). Matches ``flwr.serverapp.strategy.FedAdagrad`` at ``beta_1 = 0``.
"""

from __future__ import annotations

import numpy as np

from .fedopt import FedOpt


class FedAdagrad(FedOpt):
    name = "fedadagrad"

    def __init__(self, *, eta: float = 1e-1, beta_1: float = 0.0, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=0.0, tau=tau)

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v + delta**2
