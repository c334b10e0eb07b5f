"""FedAvg with server momentum, FedAvgM (Hsu, Qi and Brown, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", arXiv:1909.06335, 2019).

Update rule, per array, with ``Delta_t = sum_k (n_k / N) delta_k`` the example-weighted mean
update of round t, server learning rate ``eta`` and momentum ``beta``::

    m_t          = beta * m_{t-1} + Delta_t,        m_0 = 0
    theta_next   = theta + eta * m_t

(heavy-ball momentum as in ``torch.optim.SGD``, on the pseudo-gradient ``-Delta_t``). Options:
``server_learning_rate`` (1.0), ``server_momentum`` (0.9, as in Hsu et al.; Flower's default 0 is
FedAvg). Needs only the mean (``"sum"``): composes with secure aggregation. State per cohort:
``m/<key>`` (float64).

Flower: ``flwr.serverapp.strategy.FedAvgM`` keeps the momentum of the pseudo-gradient
``g_t = theta - mean_k theta_k = -Delta_t`` and steps ``theta - eta * v_t``; the same with ``m = -v``.
Flower seeds ``v_1 = g_1``, which equals ``beta * 0 + g_1``.
"""

from __future__ import annotations

import numpy as np

from .base import Combined, State, Strategy, StrategyState, apply, as_mean, real_option, require_state


class FedAvgM(Strategy):
    name = "fedavgm"
    needs = "sum"

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.9) -> None:
        self.server_learning_rate = real_option(self.name, "server_learning_rate", server_learning_rate, low=0.0, low_open=True)
        self.server_momentum = real_option(self.name, "server_momentum", server_momentum, low=0.0, high=1.0, high_open=True)

    def init_state(self, global_state: State) -> StrategyState:
        return {f"m/{k}": np.zeros(np.shape(v), dtype=np.float64) for k, v in global_state.items()}

    def step(self, cohort: str, round_: int, global_state: State, combined: Combined,
             state: StrategyState) -> tuple[dict[str, np.ndarray], StrategyState]:
        mean = as_mean(self.name, cohort, round_, global_state, combined)
        require_state(self.name, cohort, round_, state, {f"m/{k}": np.shape(v) for k, v in global_state.items()})
        m = {k: self.server_momentum * np.asarray(state[f"m/{k}"], dtype=np.float64) + mean[k] for k in global_state}
        return (apply(global_state, {k: self.server_learning_rate * v for k, v in m.items()}),
                {f"m/{k}": v for k, v in m.items()})
