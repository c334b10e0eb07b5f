"""The warning a cohort gets when it ends at its majority baseline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fedlora.server.advice import majority_warnings


def test_a_cohort_at_its_majority_baseline_is_warned_and_one_above_is_not() -> None:
    summary = {"cohorts": {"finance": {"accuracy": 0.561, "majority_baseline": 0.560},
                           "medical": {"accuracy": 0.80, "majority_baseline": 0.40},
                           "retail": {"accuracy": None, "majority_baseline": 0.5}}}
    lines = majority_warnings(summary, dp=True)
    assert len(lines) == 1 and "cohort finance ended at its majority baseline" in lines[0]
    assert "--local-epochs" in lines[0] and "--epsilon" in lines[0]
    assert "--epsilon" not in majority_warnings(summary, dp=False)[0]


def test_a_run_that_learns_nothing_says_so_in_its_summary_and_log(make_config, tmp_path: Path, caplog) -> None:
    from fedlora.simulation.runner import simulate

    cfg = make_config(tmp_path / "run", train__rounds=1, train__local_steps=1, train__learning_rate=1e-9,
                      demo__label_skew=100.0, cohorts={"finance": {"sites": 2}})
    with caplog.at_level(logging.WARNING, logger="fedlora.server"):
        _, summary = simulate(cfg, progress=False)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    c = summary["cohorts"]["finance"]
    assert c["accuracy"] <= c["majority_baseline"] + 0.02  # an untrained head (fixed seed)
    assert len(on_disk["warnings"]) == 1 and "cohort finance" in on_disk["warnings"][0]
    assert any("majority baseline" in r.getMessage() for r in caplog.records)
