"""Coordinate-wise median of the sites' updates (Yin et al., ICML 2018): a robust rule.

Update rule, per coordinate::

    theta_next = theta + median_k delta_k

(unweighted: a site's example count cannot buy it more influence). A minority of arbitrary
updates moves each coordinate at most to the range of the honest ones. It needs every site's
update individually, so it cannot run under secure aggregation (which reveals only the sum);
the coordinator refuses that combination before the run starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import SiteUpdate, State, Strategy


class CoordinateMedian(Strategy):
    name = "median"
    linear = False

    def aggregate(self, global_state: State, updates: Sequence[SiteUpdate]) -> dict[str, np.ndarray]:
        if not updates:
            raise ValueError("no updates to aggregate")
        return {k: (np.asarray(v, dtype=np.float64)
                    + np.median(np.stack([np.asarray(u.delta[k], dtype=np.float64) for u in updates]), axis=0)).astype(np.float32)
                for k, v in global_state.items()}
