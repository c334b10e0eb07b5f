"""Warnings a run's summary carries when a cohort learned nothing useful.

A cohort "ends at its majority baseline" when its final accuracy is within ``MARGIN`` of the
share of its most frequent eval label: a classifier that always answers that label scores as
much. The warning says what to try, in the order that most often helps on real files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

MARGIN = 0.02
log = logging.getLogger("fedlora.server")


def majority_warnings(summary: Mapping[str, Any], *, dp: bool) -> list[str]:
    """One line per cohort whose final accuracy is at most its majority baseline + ``MARGIN``."""
    out = []
    for name, c in summary.get("cohorts", {}).items():
        acc, maj = c.get("accuracy"), c.get("majority_baseline")
        if acc is None or maj is None or acc > maj + MARGIN:
            continue
        tips = ["more local work (--local-epochs 2, or more --rounds)", "another learning rate (--lr, x3 or /3)"]
        if dp:
            tips += ["a larger expected batch (--batch-size; DP noise on the mean shrinks as 1/batch)",
                     "a larger budget (--epsilon) or more records per site (fewer --sites)"]
        out.append(f"cohort {name} ended at its majority baseline (accuracy {acc:.3f}, majority {maj:.3f}): the adapter predicts "
                   f"little beyond the most frequent label; try " + "; ".join(tips))
    return out


def with_warnings(summary: dict[str, Any], *, dp: bool) -> dict[str, Any]:
    """``summary`` with ``"warnings"`` set (each also logged at WARNING)."""
    warnings = majority_warnings(summary, dp=dp)
    for w in warnings:
        log.warning("%s", w)
    summary["warnings"] = warnings
    return summary
