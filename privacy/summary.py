"""What a ledger says one privacy unit spent, as plain JSON-ready dicts.

Shared by the coordinator's ``summary.json`` and ``fedlora privacy-report``: epsilon is
recomputed from the unit's events at the delta the ledger declares for it. A site's epsilon
composes every sample-level event it released under: its DP-SGD rounds (``dp_sgd``, Poisson-
subsampled Gaussian, ``steps`` steps at rate q) and its noised eval releases (``eval_noise``, one
unsampled Gaussian each). An infinite epsilon (a mechanism without noise) is ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .accounting import Mechanism, epsilon
from .events import DpSgdEvent, EvalNoiseEvent
from .ledger import PrivacyLedger

DEFAULT_DELTA = 1e-5  # for a unit whose delta was never declared (a ledger written by hand)
DECLARED = ("policy", "noise", "attested_by", "public_size", "eval_metrics", "eval_budget_fraction", "unit", "identity")  # shown when a site declares them


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def cumulative(mechs: Sequence[tuple[int, Mechanism]], delta: float, accountant: str) -> list[list[float | None]]:
    """[[round, epsilon after that round], ...] composing from the first event on; several
    events of one round in a row (DP-SGD then the eval release) give one point, after the last."""
    out: list[list[float | None]] = []
    seen: list[Mechanism] = []
    for i, (round_, m) in enumerate(mechs):
        seen.append(m)
        if i + 1 < len(mechs) and mechs[i + 1][0] == round_:
            continue
        out.append([round_, finite(epsilon(seen, delta, accountant))])
    return out


def _event_dict(e: DpSgdEvent | EvalNoiseEvent) -> dict[str, Any]:
    d: dict[str, Any] = {"kind": e.kind, "round": e.round, "noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate,
                         "steps": e.steps}
    if isinstance(e, DpSgdEvent):
        d["max_grad_norm"] = e.max_grad_norm
    return d


def site_spend(ledger: PrivacyLedger, site: str) -> dict[str, Any] | None:
    """Sample-level DP of one site (None if it has no sample-level event). ``epsilon`` and
    ``epsilon_by_round`` compose all its events (DP-SGD and eval releases); ``noise_multiplier``,
    ``sample_rate``, ``max_grad_norm`` are its last DP-SGD round's, ``steps`` its DP-SGD steps in
    all; ``eval_releases`` counts its noised eval releases; ``events`` lists every event (with
    ``kind``) so that epsilon can be recomputed from them alone."""
    events = ledger.unit_events(site)
    if not events:
        return None
    sgd = [e for e in events if isinstance(e, DpSgdEvent)]
    evals = [e for e in events if isinstance(e, EvalNoiseEvent)]
    d = ledger.declarations.get(site, {})
    last, delta = events[-1], float(d.get("delta", DEFAULT_DELTA))
    last_sgd = sgd[-1] if sgd else None
    mechs = [(e.round, Mechanism(e.noise_multiplier, e.sample_rate, e.steps)) for e in events]
    out: dict[str, Any] = {
        "cohort": last.cohort, "epsilon": finite(epsilon([m for _, m in mechs], delta, last.accountant)), "delta": delta,
        "delta_rule": d.get("delta_rule", "not declared"), "budget_epsilon": d.get("budget_epsilon"),
        "noise_multiplier": last_sgd.noise_multiplier if last_sgd else None, "sample_rate": last_sgd.sample_rate if last_sgd else None,
        "steps": sum(e.steps for e in sgd), "max_grad_norm": last_sgd.max_grad_norm if last_sgd else None,
        "accountant": last.accountant, "rounds_joined": [e.round for e in sgd],
        "eval_releases": len(evals), "eval_noise_multiplier": evals[-1].noise_multiplier if evals else None,
        "epsilon_by_round": cumulative(mechs, delta, last.accountant),
        "events": [_event_dict(e) for e in events],
    }
    out |= {k: d[k] for k in DECLARED if k in d}
    return out


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
        "noised_by": last.noised_by, "adjacency": last.adjacency, "epsilon_by_round": cumulative(mechs, delta, last.accountant),
        "events": [{"kind": e.kind, "round": e.round, "noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate,
                    "steps": e.steps, "clip_norm": e.clip_norm, "noised_by": e.noised_by, "adjacency": e.adjacency} for e in events],
    }
