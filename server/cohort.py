"""What the coordinator keeps per cohort and per round, and how it reads a batch of replies.

A site may send any bytes: ``train_metrics_problem`` and ``eval_metrics_problem`` name what
makes its clear metrics unusable (a count that is not a positive integer, a NaN, infinite or
negative loss, negative steps or seconds, counts that do not add up); such a site is left out
of the round and named in the cohort's ``sites_failed`` (eval: ``eval_sites_failed``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message

from fedlora.protocol import EvalMetrics, TrainMetrics
from fedlora.strategies import SiteUpdate

log = logging.getLogger("fedlora.server")


@dataclass
class Cohort:
    name: str
    labels: list[str]
    nodes: dict[int, str] = field(default_factory=dict)  # node id -> site name
    state: dict[str, np.ndarray] = field(default_factory=dict)
    active: bool = True  # False once every site of the cohort has spent its privacy budget
    selected: list[int] = field(default_factory=list)  # nodes sampled for the current round
    exhausted: set[str] = field(default_factory=set)  # sites that refused a round: their budget is spent
    secure: bool = False  # aggregated with secure aggregation (enough sites and enabled)
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)  # the strategy's per-cohort arrays (server moments)


@dataclass
class RoundReplies:
    """What one cohort's sampled sites sent back in a train round."""

    updates: list[SiteUpdate] = field(default_factory=list)
    losses: list[tuple[float, float]] = field(default_factory=list)  # (train loss, examples)
    seconds: list[float] = field(default_factory=list)
    unclipped: list[int] = field(default_factory=list)  # client-level DP: 1 if the update was within C
    failed: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # failed site -> why (metrics.jsonl ``sites_failed_reasons``)
    refused: list[str] = field(default_factory=list)
    policy_refused: list[str] = field(default_factory=list)  # sites that refused the round under their privacy policy
    private: bool = False  # some site attested a DP event: no train loss is released for the cohort
    advertised: dict[int, tuple[bytes, ...]] = field(default_factory=dict)  # secure aggregation: node -> (c_pk, s_pk, sig, cert)

    def fail(self, site: str, reason: str) -> None:
        """Leave ``site`` out of the round, saying why."""
        self.failed.append(site)
        self.reasons.setdefault(site, reason)


def _finite_at_least_zero(value: float | None) -> bool:
    return value is None or (math.isfinite(value) and value >= 0)


def train_metrics_problem(m: TrainMetrics) -> str:
    """What makes a clear train reply's metrics unusable ("" if nothing): ``num_examples`` not
    a positive integer (it weights the update), ``steps`` below 0, a train loss or seconds that
    are not finite and >= 0, a clip bit other than 0 or 1."""
    if m.num_examples < 1:
        return f"it reported {m.num_examples} training examples (a positive integer is needed)"
    if m.steps < 0:
        return f"it reported {m.steps} steps"
    if not _finite_at_least_zero(m.train_loss):
        return f"it reported a train loss of {m.train_loss} (finite and >= 0 needed)"
    if not _finite_at_least_zero(m.train_seconds):
        return f"it reported {m.train_seconds} train seconds (finite and >= 0 needed)"
    if m.update_unclipped not in (None, 0, 1):
        return f"its clip bit is {m.update_unclipped}, not 0 or 1"
    return ""


def eval_metrics_problem(m: EvalMetrics, buckets: int) -> str:
    """What makes a clear eval reply's metrics unusable ("" if nothing): ``num_examples`` not a
    positive integer, a loss that is not finite and >= 0, an accuracy outside [0, 1], not
    ``buckets`` non-negative counts, counts that do not add up to the examples (a noised release
    reads ``max(1, sum of counts)``: ``fedlora.privacy.eval_release.read``), seconds not finite
    and >= 0."""
    counts: Sequence[int] = m.label_counts
    if m.num_examples < 1:
        return f"it reported {m.num_examples} eval examples (a positive integer is needed)"
    if not (math.isfinite(m.eval_loss) and m.eval_loss >= 0):
        return f"it reported an eval loss of {m.eval_loss} (finite and >= 0 needed)"
    if not (math.isfinite(m.accuracy) and 0 <= m.accuracy <= 1):
        return f"it reported an accuracy of {m.accuracy} (in [0, 1] needed)"
    if len(counts) != buckets or min(counts, default=0) < 0:
        return f"label counts {list(counts)[:8]} for {buckets} buckets"
    if m.num_examples != max(1, sum(counts)):
        return f"its label counts sum to {sum(counts)}, but it reported {m.num_examples} eval examples"
    if not _finite_at_least_zero(m.eval_seconds):
        return f"it reported {m.eval_seconds} eval seconds (finite and >= 0 needed)"
    return ""


def failed_entry(cohort: Cohort, got: RoundReplies, failed: dict[int, str]) -> dict[str, Any]:
    """A secure cohort's ``sites_failed`` and ``sites_failed_reasons``: the sites whose train
    reply failed, then (in name order) those the secure sum left out (``failed``: node -> why)."""
    lost = {cohort.nodes[u]: why for u, why in failed.items() if u in cohort.nodes}
    out: dict[str, Any] = {"sites_failed": got.failed + sorted(set(lost) - set(got.failed))}
    reasons = got.reasons | {s: lost[s] for s in sorted(lost) if s not in got.reasons}
    if reasons:
        out["sites_failed_reasons"] = reasons
    return out


def ok_replies(cohort: Cohort, replies: dict[int, Message], round_: int, kind: str) -> Iterator[tuple[int, str, Message]]:
    """(node, site, reply) for every site of the cohort that answered without an error, in site
    name order (a fixed order: the same float sums on every engine); errors are logged."""
    for node, site in sorted(cohort.nodes.items(), key=lambda kv: kv[1]):
        reply = replies.get(node)
        if reply is None:
            continue
        if reply.has_error():
            log.warning("round %d %s: %s", round_, kind, reply.error.reason)
            continue
        yield node, site, reply


def weighted(pairs: Iterable[tuple[float, float]]) -> float | None:
    pairs = list(pairs)
    total = sum(n for _, n in pairs)
    return float(sum(v * n for v, n in pairs) / total) if total else None
