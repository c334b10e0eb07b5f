"""What ``summary.json`` says of each cohort and of the privacy spent (built once, at the end)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedlora.config import PrivacyConfig, RunConfig
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.summary import client_spend, site_spend

from .client_dp import ClientLevelDp
from .cohort import Cohort


def cohort_summary(cohort: Cohort, initial: Mapping[str, Any], last: Mapping[str, Any], extra: tuple[str, ...] = (),
                   skipped: str = "") -> dict[str, Any]:
    """A cohort's sites, labels, final metrics (from the last metrics line; ``extra``: the task's own
    fields, e.g. perplexity, with their initial values), initial accuracy, adapter folder and
    whether it was aggregated securely. A cohort ``skipped`` for the run (fail closed: too few
    sites for secure aggregation) has the reason, no metrics, no adapter and
    ``secure_aggregation`` None (it was not aggregated at all)."""
    if skipped:
        out = {"sites": sorted(cohort.nodes.values()), "labels": cohort.labels, "skipped": skipped, "accuracy": None,
               "eval_loss": None, "majority_baseline": None, "initial_accuracy": None, "train_loss": None, "adapter": None,
               "secure_aggregation": None}
        return out | {key: None for k in extra for key in (k, f"initial_{k}")}
    end, start = last["cohorts"][cohort.name], initial["cohorts"][cohort.name]
    out = {"sites": sorted(cohort.nodes.values()), "labels": cohort.labels, "accuracy": end["accuracy"], "eval_loss": end["eval_loss"],
           "majority_baseline": end["majority_baseline"], "initial_accuracy": start["accuracy"],
           "train_loss": end.get("train_loss"), "adapter": f"adapters/{cohort.name}", "secure_aggregation": cohort.secure}
    for k in extra:
        out[k], out[f"initial_{k}"] = end.get(k), start.get(k)
    return out


def all_skipped_message(skipped: Mapping[str, str]) -> str:
    """Why a run with every cohort skipped does not start (``FederationError``)."""
    return ("every cohort would be skipped, nothing to train: " + "; ".join(f"cohort {c}: {why}" for c, why in sorted(skipped.items()))
            + ". Add sites, or allow clear aggregation (secure_aggregation.allow_clear = true)")


def incomplete_message(skipped: Mapping[str, str]) -> str:
    """The CLI's one line for a run that finished with some cohorts skipped (``RunIncomplete``)."""
    return (f"the run finished, but cohort(s) {', '.join(sorted(skipped))} were skipped (too few sites for secure aggregation; "
            "nothing of theirs trained or released; see summary.json cohorts_skipped); add sites or rerun with "
            "--allow-clear-aggregation")


def partition_summary(cfg: RunConfig) -> dict[str, Any] | None:
    """How the cohorts' data files were split across their sites (``[partition]``: the scheme and
    the parameters it uses, and the cohorts it applied to); None when every cohort ran on demo data."""
    cohorts = [c.name for c in cfg.cohorts if c.data]
    return {**cfg.partition.describe(), "cohorts": cohorts} if cohorts else None


def privacy_summary(cfg: PrivacyConfig, client_dp: ClientLevelDp | None, ledger: PrivacyLedger,
                    cohorts: Mapping[str, Cohort]) -> dict[str, Any]:
    """Per site (sample-level DP) and per cohort (client-level DP): epsilon recomputed from the
    run's ledger at each unit's declared delta, with the parameters to recompute it."""
    out: dict[str, Any] = {"dp": cfg.dp, "client_dp": cfg.client_dp, "attested_by": "the sites (the coordinator checks and records "
                           "what each site attests; the sites' own ledgers are authoritative)"}
    if client_dp is not None:
        sampling = client_dp.sampling if client_dp.q >= 1 else (f"{client_dp.sampling} (sites picked at rate {client_dp.q:g} per "
                                                                "round, accounted at sample rate 1)")
        out["client_level"] = {"unit": "one whole site", "sampling": sampling,
                               "adjacency": "zero-out: one site's contribution replaced by zeros (the site list is public)",
                               "noised_by": cfg.client_noise, "adaptive_clip": cfg.adaptive_clip,
                               "cohorts": {c: client_spend(ledger, c) for c in cohorts}}
    if cfg.dp or any(ledger.unit_events(s) for c in cohorts.values() for s in c.nodes.values()):
        # sites whose own policy requires DP attest their events even when the run did not ask for DP
        spent = {s: site_spend(ledger, s) for c in cohorts.values() for s in sorted(c.nodes.values())}
        out |= {"unit": "one record at one site", "sampling": "poisson", "noised_by": "each site (DP-SGD)",
                "sites": {s: v for s, v in sorted(spent.items()) if v is not None}}
    return out
