"""The aggregation pipeline: per cohort and round, combine -> optional client-level DP -> the strategy's step.

1. **Combine** what the round delivered into what the strategy needs (``Strategy.needs``):
   ``"sum"``: the weighted mean update, with weights ``strategy.weight(n, federation.weight_cap)``,
   formed in the clear (``Strategy.combine``) or read from the unmasked secure sum (each site
   applied ``site_weight`` before masking: the same weights, ``fedlora.strategies.base``);
   ``"each"``: every site's update, in the clear only (refused under secure aggregation and
   client-level DP at config time).
2. **Client-level DP** (``privacy.client_dp``): instead of the weighted mean, the noised mean
   of the clipped updates (``ClientLevelDp``: in the clear from the updates, under secure
   aggregation from the sum), with its ``ClientDpEvent``. Whatever the strategy does next is
   post-processing of that release.
3. **Step**: ``strategy.step(cohort, round, global, combined, state)`` gives the cohort's next
   adapter and the strategy's next per-cohort state (``Cohort.strategy_state``: server-optimiser
   moments, saved as arrays in the checkpoint).

The coordinator keeps the round loop (who is sent what, who answered, what failed); this
module owns the arithmetic between the replies and the next adapter, in one place for every
mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlora.privacy.events import ClientDpEvent
from fedlora.privacy.secagg_vector import AggregateSum
from fedlora.strategies import SiteUpdate, Strategy
from fedlora.strategies.base import Combined

from .client_dp import ClientLevelDp
from .cohort import Cohort


@dataclass(frozen=True)
class Release:
    """What one cohort's round hands to the strategy's step: ``combined`` (the mean update or the
    updates), the client-level DP event that released it (None without client-level DP) and the
    release's figures for ``metrics.jsonl`` (clip norm, noise, ...)."""

    combined: Combined
    event: ClientDpEvent | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Aggregation:
    """Combine, release and step for every cohort of a run (see the module docstring)."""

    def __init__(self, strategy: Strategy, weight_cap: float, client_dp: ClientLevelDp | None = None,
                 accountant: str = "rdp") -> None:
        self.strategy, self.weight_cap, self.client_dp, self.accountant = strategy, float(weight_cap), client_dp, accountant

    def init_state(self, cohort: Cohort) -> None:
        """The strategy's state for a cohort before its first round (from its initial adapter)."""
        cohort.strategy_state = self.strategy.init_state(cohort.state)

    def from_updates(self, cohort: Cohort, round_: int, updates: Sequence[SiteUpdate], unclipped: Sequence[int],
                     rng: np.random.Generator) -> Release:
        """Stages 1-2 for updates seen in the clear (``weight``: each site's reported examples).
        With client-level DP the release exists even when no site was sampled (noise only)."""
        if self.client_dp is not None:
            shapes = {k: v.shape for k, v in cohort.state.items()}
            mean, event, info = self.client_dp.aggregate(round_, cohort.name, shapes, [u.delta for u in updates], list(unclipped),
                                                         len(cohort.selected), rng, self.accountant)
            return Release(mean, event, info)
        return Release(self.strategy.combine(updates, self.weight_cap))

    def from_secure_sum(self, cohort: Cohort, round_: int, agg: AggregateSum, rng: np.random.Generator) -> Release:
        """Stages 1-2 for a checked, unmasked secure sum (``read_sum``): its weighted mean, or with
        client-level DP the noised release of its sum (the sites sent weight 1 each)."""
        if self.client_dp is None:
            return Release(agg.mean_delta)
        summed = {k: v * np.float32(agg.weight) for k, v in agg.mean_delta.items()}
        mean, event, info = self.client_dp.release_sum(round_, cohort.name, summed, agg.sites, len(cohort.selected), agg.unclipped,
                                                       rng, self.accountant)
        return Release(mean, event, info)

    def step(self, cohort: Cohort, round_: int, release: Release) -> None:
        """Stage 3: the cohort's next adapter and strategy state."""
        cohort.state, cohort.strategy_state = self.strategy.step(cohort.name, round_, cohort.state, release.combined,
                                                                 cohort.strategy_state)
