"""Eval metrics that DP sites kept to themselves, read back by the simulation harness.

Under DP a site's policy ``eval_metrics = "site"`` (the default) keeps its eval metrics at the
site: they go to its log and to ``<state_dir>/eval_metrics.jsonl``, and the coordinator gets only
the word that they were kept. In a simulation the researcher runs every site, so the harness may
read those files: it combines them per cohort and round (example-weighted, as the coordinator
does in the clear) and fills the cohorts' accuracy in ``summary.json`` with
``"metrics_source": "sites' own records (simulation harness; not released to the coordinator)"``.
Nothing here crosses the federation's wire.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedlora.tasks import Task

SOURCE = "sites' own records (simulation harness; not released to the coordinator)"


def read_kept(state_dirs: Iterable[str | Path]) -> dict[str, dict[int, dict[str, Any]]]:
    """cohort -> round -> combined metrics (eval_loss, accuracy, eval_examples, majority_baseline);
    the last record of a site for a round counts (a round evaluated again after a resume)."""
    per: dict[tuple[str, int, str], dict[str, Any]] = {}
    for d in state_dirs:
        path = Path(d) / "eval_metrics.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                doc = json.loads(line)
                per[(doc["cohort"], int(doc["round"]), doc["site"])] = doc
    out: dict[str, dict[int, dict[str, Any]]] = {}
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for (cohort, round_, _), doc in sorted(per.items()):
        groups.setdefault((cohort, round_), []).append(doc)
    for (cohort, round_), docs in groups.items():
        n = sum(d["num_examples"] for d in docs)
        counts = [sum(c) for c in zip(*(d["label_counts"] for d in docs))]
        out.setdefault(cohort, {})[round_] = {
            "eval_loss": sum(d["eval_loss"] * d["num_examples"] for d in docs) / n,
            "accuracy": sum(d["accuracy"] * d["num_examples"] for d in docs) / n, "eval_examples": n,
            "majority_baseline": max(counts) / n if n else None, "eval_sites": len(docs)}
    return out


def fill_summary(summary: dict[str, Any], kept: Mapping[str, Mapping[int, Mapping[str, Any]]], task: Task | None = None) -> dict[str, Any]:
    """The summary with each cohort's missing final/initial metrics taken from the sites' records
    (read as ``task`` reports them: ``Task.report`` and its ``extra_metrics``)."""
    for cohort, entry in summary.get("cohorts", {}).items():
        rounds = kept.get(cohort)
        if not rounds or entry.get("accuracy") is not None:
            continue
        labels = entry.get("labels", [])
        shown = {r: (task.report(dict(v), labels) if task is not None else dict(v)) for r, v in sorted(rounds.items())}
        last = shown[max(shown)]
        extra = task.extra_metrics if task is not None else ()
        entry.update({k: last.get(k) for k in ("accuracy", "eval_loss", "majority_baseline", *extra)})
        if 0 in shown:
            entry["initial_accuracy"] = shown[0]["accuracy"]
            entry.update({f"initial_{k}": shown[0].get(k) for k in extra})
        entry["metrics_source"] = SOURCE
        entry["metrics_by_round"] = {str(r): v for r, v in shown.items()}
    return summary
