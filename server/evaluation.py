"""A cohort's evaluation metrics from its sites' replies: in the clear (example-weighted means of
per-site metrics) or under secure aggregation (exact integer sums; nothing per site)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Message

from fedlora.errors import FedloraError
from fedlora.privacy.secagg import SecAggAbort
from fedlora.privacy.secagg_vector import eval_length, read_eval_sum
from fedlora.protocol import EvalKept, EvalMetrics, SecAggKeys, read

from .cohort import Cohort, eval_metrics_problem, ok_replies, weighted
from .secure_round import Exchange, SecureAggregation, advertised_keys

log = logging.getLogger("fedlora.server")

# what a cohort's metrics line holds when no metric reached the coordinator
NO_METRICS: dict[str, Any] = {"eval_loss": None, "accuracy": None, "eval_examples": None, "site_eval_seconds": None,
                              "majority_baseline": None}


def kept_at_sites(cohort: Cohort, replies: dict[int, Message], round_: int) -> list[str]:
    """The sites that evaluated and kept their metrics (their policy), in name order."""
    return [site for _, site, r in ok_replies(cohort, replies, round_, "evaluate") if EvalKept.record in r.content]


def clear_metrics(cohort: Cohort, replies: dict[int, Message], round_: int, buckets: int) -> dict[str, Any]:
    """Example-weighted eval loss and accuracy over the sites' own metrics, the summed counts
    (``buckets`` of them, the task's ``count_buckets``: per label, the majority baseline) and the
    sites' evaluation seconds. Sites that kept their metrics are listed (``eval_kept_by``); a
    malformed reply or unusable metrics (``eval_metrics_problem``) are left out, logged and
    named (``eval_sites_failed`` and ``eval_sites_failed_reasons``)."""
    losses, accs, seconds, counts = [], [], [], np.zeros(buckets, dtype=np.int64)
    failed: dict[str, str] = {}
    kept = kept_at_sites(cohort, replies, round_)
    for _, site, reply in ok_replies(cohort, replies, round_, "evaluate"):
        if site in kept:
            continue
        try:
            m = read(EvalMetrics, reply.content, "evaluate")
            problem = eval_metrics_problem(m, buckets)
            if problem:
                raise FedloraError(problem)
        except FedloraError as e:
            log.warning("round %d: left out the eval metrics of site %s: %s", round_, site, e)
            failed[site] = f"rejected: {e}"
            continue
        n = float(m.num_examples)
        losses.append((m.eval_loss, n))
        accs.append((m.accuracy, n))
        if m.eval_seconds is not None:
            seconds.append(m.eval_seconds)
        counts += np.asarray(m.label_counts, dtype=np.int64)
    out = {"eval_loss": weighted(losses), "accuracy": weighted(accs), "eval_examples": int(counts.sum()),
           "site_eval_seconds": float(np.sum(seconds)) if seconds else None,
           "majority_baseline": float(counts.max() / counts.sum()) if counts.sum() else None}
    if kept:
        out["eval_kept_by"] = kept
    return out | failed_fields(failed)


def failed_fields(failed: dict[str, str]) -> dict[str, Any]:
    """``eval_sites_failed`` (names) and ``eval_sites_failed_reasons`` (name -> why), if any failed."""
    return {"eval_sites_failed": sorted(failed), "eval_sites_failed_reasons": dict(sorted(failed.items()))} if failed else {}


def secure_metrics(secagg: SecureAggregation, exchange: Exchange, cohort: Cohort, replies: dict[int, Message],
                   round_: int, buckets: int | None = None) -> dict[str, Any]:
    """The same figures summed over the cohort with secure aggregation (the sites answered the
    ``evaluate`` message with their public keys); an abort leaves them unknown and says why.
    ``buckets`` (the task's ``count_buckets``) fixes the length of every site's vector; the
    unmasked sum is checked (``check_eval_sum``; noised when a site attests an eval noise
    event). Sites left out of the sum are named (``eval_sites_failed``)."""
    advertised, kept, noised, failed = {}, [], False, {}
    for node, site, r in ok_replies(cohort, replies, round_, "evaluate"):
        if EvalKept.record in r.content:
            kept.append(site)
            continue
        try:
            keys = read(SecAggKeys, r.content, "evaluate")
        except FedloraError as e:
            log.warning("round %d: left out site %s from the secure eval sum: %s", round_, site, e)
            failed[site] = f"rejected: {e}"
            continue
        advertised[node] = advertised_keys(keys)
        noised |= "privacy_event" in r.content  # its vector carries DP noise (the event was checked on arrival)
    if kept and not advertised:
        return NO_METRICS | {"eval_examples": 0, "eval_kept_by": kept} | failed_fields(failed)
    lost: dict[int, str] = {}
    try:
        if not advertised:
            raise SecAggAbort("no site sent its keys")
        total, survivors, _ = secagg.secure_sum(exchange, cohort.name, round_, advertised, "evaluate",
                                                length=None if buckets is None else eval_length(buckets), failed=lost)
        m = read_eval_sum(total, len(survivors), noised=noised)  # checks the sum's structure (ForgedSum)
    except (SecAggAbort, ValueError) as e:
        log.warning("round %d: secure aggregation of cohort %r's eval metrics aborted: %s", round_, cohort.name, e)
        failed |= {cohort.nodes[u]: why for u, why in lost.items() if u in cohort.nodes}
        return NO_METRICS | {"eval_examples": 0, "secure_aggregation_eval_aborted": str(e)} | failed_fields(failed)
    failed |= {cohort.nodes[u]: why for u, why in lost.items() if u in cohort.nodes}
    return {"eval_loss": m.eval_loss, "accuracy": m.accuracy, "eval_examples": m.examples, "site_eval_seconds": None,
            "eval_sites": m.sites, "majority_baseline": float(m.label_counts.max() / m.examples) if m.examples else None,
            **failed_fields(failed)}
