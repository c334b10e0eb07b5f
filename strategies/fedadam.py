"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): Adam on the server.

Update rule (see ``fedopt`` for ``Delta_t``, ``m_t`` and the step)::

    v_t  = beta_2 * v_{t-1} + (1 - beta_2) * Delta_t^2
    eta_t = eta * sqrt(1 - beta_2^t) / (1 - beta_1^t)        (bias correction; eta_t = eta without it)
    theta_next = theta + eta_t * m_t / (sqrt(v_t) + tau)

Options: ``eta`` (0.1), ``beta_1`` (0.9), ``beta_2`` (0.99), ``tau`` (1e-3), ``bias_correction``
(true), Flower's defaults. Needs only the mean (``"sum"``): composes with secure aggregation.

Bridged difference from Flower (``flwr.serverapp.strategy.FedAdam``): Flower bias-corrects with
``t = server_round + 1`` (``t = 2`` in its first round, Kingma and Ba's ``t = 1``); we use the
number of steps this cohort has taken (``t = 1, 2, ...``, kept in the state, so a cohort that
skips a round is not advanced and a resume is exact): our step ``t`` is Flower's
``server_round = t - 1``. The paper's Algorithm 2 has no bias correction: ``bias_correction = false``.
"""

from __future__ import annotations

import numpy as np

from .base import bool_option
from .fedopt import FedOpt


class FedAdam(FedOpt):
    name = "fedadam"

    def __init__(self, *, eta: float = 1e-1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3,
                 bias_correction: bool = True) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)
        self.bias_correction = bool_option(self.name, "bias_correction", bias_correction)

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1.0 - self.beta_2) * delta**2

    def learning_rate(self, t: int) -> float:
        if not self.bias_correction:
            return self.eta
        return self.eta * float(np.sqrt(1.0 - self.beta_2**t)) / (1.0 - self.beta_1**t)
