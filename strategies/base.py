"""The strategy interface: turn the sites' adapter updates into the next global adapter.

A site's update is ``delta_k = theta_k - theta`` (its locally trained adapter minus the global
adapter it started from) with a weight ``n_k`` (its number of training examples). Strategies
only see updates, never data; one cohort is aggregated at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

State = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class SiteUpdate:
    """One site's contribution to a round: its update and its aggregation weight."""

    site: str
    delta: State
    weight: float


class Strategy(ABC):
    """Owns the update rule; ``aggregate`` is called once per cohort per round."""

    name: str = "strategy"
    # True when the rule needs only the weighted sum of the updates and the sum of the weights
    # (FedAvg): only such strategies compose with secure aggregation, which reveals nothing else
    linear: bool = False

    @abstractmethod
    def aggregate(self, global_state: State, updates: Sequence[SiteUpdate]) -> dict[str, np.ndarray]:
        """Return the next global state from the current one and the sites' updates."""

    def state_dict(self) -> dict[str, Any]:
        """The strategy's own state across rounds (server-optimiser moments), JSON-serialisable,
        for checkpoints; stateless strategies have none."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, but the checkpoint holds {sorted(state)}")


def _registry() -> dict[str, type[Strategy]]:
    from .fedavg import FedAvg
    from .median import CoordinateMedian

    return {"fedavg": FedAvg, "median": CoordinateMedian}


def get_strategy(name: str) -> Strategy:
    """The strategy registered under ``name``; an unknown name lists the known ones."""
    known = _registry()
    if name not in known:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(known))}")
    return known[name]()
