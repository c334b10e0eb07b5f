"""What a ledger says one privacy unit spent, as plain JSON-ready dicts.

Shared by the coordinator's ``summary.json`` and ``fedlora privacy-report``: epsilon is
recomputed from the unit's events at the delta the ledger declares for it. An infinite epsilon
(a mechanism without noise) is ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .accounting import Mechanism, epsilon
from .ledger import PrivacyLedger

DEFAULT_DELTA = 1e-5  # for a unit whose delta was never declared (a ledger written by hand)


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def cumulative(mechs: Sequence[tuple[int, Mechanism]], delta: float, accountant: str) -> list[list[float | None]]:
    """[[round, epsilon after that round], ...] composing from the first event on."""
    out, seen = [], []
    for round_, m in mechs:
        seen.append(m)
        out.append([round_, finite(epsilon(seen, delta, accountant))])
    return out


def site_spend(ledger: PrivacyLedger, site: str) -> dict[str, Any] | None:
    """Sample-level DP of one site (None if it has no DP-SGD event)."""
    events = ledger.site_events(site)
    if not events:
        return None
    d = ledger.declarations.get(site, {})
    last, delta = events[-1], float(d.get("delta", DEFAULT_DELTA))
    mechs = [(e.round, Mechanism(e.noise_multiplier, e.sample_rate, e.steps)) for e in events]
    return {
        "cohort": last.cohort, "epsilon": finite(epsilon([m for _, m in mechs], delta, last.accountant)), "delta": delta,
        "delta_rule": d.get("delta_rule", "not declared"), "budget_epsilon": d.get("budget_epsilon"),
        "noise_multiplier": last.noise_multiplier, "sample_rate": last.sample_rate, "steps": sum(e.steps for e in events),
        "max_grad_norm": last.max_grad_norm, "accountant": last.accountant, "rounds_joined": [e.round for e in events],
        "epsilon_by_round": cumulative(mechs, delta, last.accountant),
        "events": [{"round": e.round, "noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate, "steps": e.steps,
                    "max_grad_norm": e.max_grad_norm} for e in events],
    }


def client_spend(ledger: PrivacyLedger, cohort: str) -> dict[str, Any] | None:
    """Client-level DP of one cohort (None if it has no client-level event)."""
    events = ledger.cohort_events(cohort)
    if not events:
        return None
    d = ledger.declarations.get(f"cohort:{cohort}", {})
    last, delta = events[-1], float(d.get("delta", DEFAULT_DELTA))
    mechs = [(e.round, Mechanism(e.noise_multiplier, e.sample_rate, e.steps)) for e in events]
    return {
        "epsilon": finite(epsilon([m for _, m in mechs], delta, last.accountant)), "delta": delta,
        "delta_rule": d.get("delta_rule", "not declared"), "accountant": last.accountant, "sample_rate": last.sample_rate,
        "noised_by": last.noised_by, "epsilon_by_round": cumulative(mechs, delta, last.accountant),
        "events": [{"round": e.round, "noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate, "clip_norm": e.clip_norm,
                    "noised_by": e.noised_by} for e in events],
    }
