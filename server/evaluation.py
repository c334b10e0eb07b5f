"""A cohort's evaluation metrics from its sites' replies: in the clear (example-weighted means of
per-site metrics) or under secure aggregation (exact integer sums; nothing per site)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Message

from fedlora.privacy.secagg import SecAggAbort
from fedlora.privacy.secagg_vector import read_eval_sum

from .cohort import Cohort, ok_replies, weighted
from .secure_round import Exchange, SecureAggregation

log = logging.getLogger("fedlora.server")

# what a cohort's metrics line holds when no metric reached the coordinator
NO_METRICS: dict[str, Any] = {"eval_loss": None, "accuracy": None, "eval_examples": None, "site_eval_seconds": None,
                              "majority_baseline": None}


def clear_metrics(cohort: Cohort, replies: dict[int, Message], round_: int) -> dict[str, Any]:
    """Example-weighted eval loss and accuracy over the sites' own metrics, the summed label
    counts (majority baseline) and the sites' evaluation seconds."""
    losses, accs, seconds, counts = [], [], [], np.zeros(len(cohort.labels), dtype=np.int64)
    for _, _, reply in ok_replies(cohort, replies, round_, "evaluate"):
        m = reply.content["metrics"]
        n = float(m["num_examples"])
        losses.append((float(m["eval_loss"]), n))
        accs.append((float(m["accuracy"]), n))
        seconds.append(float(m["eval_seconds"]))
        counts += np.asarray(list(m["label_counts"]), dtype=np.int64)
    return {"eval_loss": weighted(losses), "accuracy": weighted(accs), "eval_examples": int(counts.sum()),
            "site_eval_seconds": float(np.sum(seconds)),
            "majority_baseline": float(counts.max() / counts.sum()) if counts.sum() else None}


def secure_metrics(secagg: SecureAggregation, exchange: Exchange, cohort: Cohort, replies: dict[int, Message],
                   round_: int) -> dict[str, Any]:
    """The same figures summed over the cohort with secure aggregation (the sites answered the
    ``evaluate`` message with their public keys); an abort leaves them unknown and says why."""
    advertised = {node: (bytes(r.content["secagg"]["c_pk"]), bytes(r.content["secagg"]["s_pk"]))
                  for node, _, r in ok_replies(cohort, replies, round_, "evaluate")}
    try:
        if not advertised:
            raise SecAggAbort("no site sent its keys")
        total, survivors, _ = secagg.secure_sum(exchange, cohort.name, round_, advertised, "evaluate")
    except (SecAggAbort, ValueError) as e:
        log.warning("round %d: secure aggregation of cohort %r's eval metrics aborted: %s", round_, cohort.name, e)
        return NO_METRICS | {"eval_examples": 0, "secure_aggregation_eval_aborted": str(e)}
    m = read_eval_sum(total, len(survivors))
    return {"eval_loss": m.eval_loss, "accuracy": m.accuracy, "eval_examples": m.examples, "site_eval_seconds": None,
            "eval_sites": m.sites, "majority_baseline": float(m.label_counts.max() / m.examples) if m.examples else None}
