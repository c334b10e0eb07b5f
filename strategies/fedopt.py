"""The adaptive server optimisers' common part (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2); FedAdam, FedYogi and FedAdagrad differ only in ``v``.

Per array, with ``Delta_t = sum_k (n_k / N) delta_k`` the example-weighted mean update (the
negative pseudo-gradient), server learning rate ``eta``, ``beta_1``, ``beta_2`` and adaptivity ``tau``::

    m_t        = beta_1 * m_{t-1} + (1 - beta_1) * Delta_t,         m_0 = 0
    v_t        = second_moment(v_{t-1}, Delta_t)                     v_0 = 0
    theta_next = theta + eta_t * m_t / (sqrt(v_t) + tau)

``eta_t = eta`` except where a rule says otherwise (FedAdam's bias correction). The client
learning rate ``eta_l`` of the paper is the sites' trainer's, not the server's. Needs only the
mean (``"sum"``): nonlinear in it, yet composes with secure aggregation. State per cohort:
``m/<key>``, ``v/<key>`` (float64) and ``t`` (int64, the number of steps taken).

Differences from the paper shared with Flower: ``v_0 = 0`` (Algorithm 2 allows ``v_{-1} >= tau^2``).
Flower (``flwr.serverapp.strategy.FedOpt``) forms ``Delta_t`` as ``mean_k theta_k - theta`` from
the sites' parameters; we receive it directly (the same quantity).
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from .base import Combined, State, Strategy, StrategyState, apply, as_mean, real_option, require_state


class FedOpt(Strategy):
    """Shared state and step of FedAdam / FedYogi / FedAdagrad; subclasses give ``second_moment``."""

    needs = "sum"

    def __init__(self, *, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
        self.eta = real_option(self.name, "eta", eta, low=0.0, low_open=True)
        self.beta_1 = real_option(self.name, "beta_1", beta_1, low=0.0, high=1.0, high_open=True)
        self.beta_2 = real_option(self.name, "beta_2", beta_2, low=0.0, high=1.0, high_open=True)
        self.tau = real_option(self.name, "tau", tau, low=0.0, low_open=True)

    @abstractmethod
    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """``v_t`` from ``v_{t-1}`` and ``Delta_t`` (float64 arrays)."""

    def learning_rate(self, t: int) -> float:
        """``eta_t`` of step ``t`` (1, 2, ...): ``eta`` unless a rule corrects it."""
        return self.eta

    def init_state(self, global_state: State) -> StrategyState:
        state = {}
        for k, v in global_state.items():
            state[f"m/{k}"] = np.zeros(np.shape(v), dtype=np.float64)
            state[f"v/{k}"] = np.zeros(np.shape(v), dtype=np.float64)
        state["t"] = np.zeros((), dtype=np.int64)
        return state

    def step(self, cohort: str, round_: int, global_state: State, combined: Combined,
             state: StrategyState) -> tuple[dict[str, np.ndarray], StrategyState]:
        mean = as_mean(self.name, cohort, round_, global_state, combined)
        expected = {"t": ()} | {f"{p}/{k}": np.shape(v) for k, v in global_state.items() for p in ("m", "v")}
        require_state(self.name, cohort, round_, state, expected)
        t = int(state["t"]) + 1
        eta_t = self.learning_rate(t)
        nxt: StrategyState = {"t": np.asarray(t, dtype=np.int64)}
        change = {}
        for k in global_state:
            m = self.beta_1 * np.asarray(state[f"m/{k}"], dtype=np.float64) + (1.0 - self.beta_1) * mean[k]
            v = self.second_moment(np.asarray(state[f"v/{k}"], dtype=np.float64), mean[k])
            nxt[f"m/{k}"], nxt[f"v/{k}"] = m, v
            change[k] = eta_t * m / (np.sqrt(v) + self.tau)
        return apply(global_state, change), nxt
