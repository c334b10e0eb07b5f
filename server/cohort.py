"""What the coordinator keeps per cohort and per round, and how it reads a batch of replies."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message

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


@dataclass
class RoundReplies:
    """What one cohort's sampled sites sent back in a train round."""

    updates: list[SiteUpdate] = field(default_factory=list)
    losses: list[tuple[float, float]] = field(default_factory=list)  # (train loss, examples)
    seconds: list[float] = field(default_factory=list)
    unclipped: list[int] = field(default_factory=list)  # client-level DP: 1 if the update was within C
    failed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    policy_refused: list[str] = field(default_factory=list)  # sites that refused the round under their privacy policy
    private: bool = False  # some site attested a DP event: no train loss is released for the cohort
    advertised: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # secure aggregation: node -> public keys


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
