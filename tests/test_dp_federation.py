"""DP-SGD across a federation: composition over rounds, the run's ledger, budget enforcement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.privacy.accounting import Mechanism, epsilon
from fedlora.privacy.ledger import PrivacyLedger
from conftest import run_with
from fedlora.simulation.runner import simulate


def test_calibrated_dp_run_stays_within_budget_and_the_ledger_recomputes_it(make_config, tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "run", train__rounds=2, privacy={"dp": True, "epsilon": 4.0})
    run, summary = simulate(cfg, progress=False)
    sites = summary["privacy"]["sites"]
    assert sorted(sites) == ["finance-1", "finance-2", "medical-1", "medical-2"]
    ledger = PrivacyLedger.load(run / "privacy_ledger.json")
    assert len(ledger.events) == 8
    for name, s in sites.items():
        assert s["rounds_joined"] == [1, 2] and s["noise_multiplier"] > 0 and s["delta"] == 1e-5
        assert 0.9 * 4.0 <= s["epsilon"] <= 4.0, (name, s)  # calibrated to use (almost) all of the budget
        assert ledger.spent(name, s["delta"]) == pytest.approx(s["epsilon"])
        # anyone can recompute epsilon from the report's own numbers
        assert epsilon([Mechanism(s["noise_multiplier"], s["sample_rate"], s["steps"])], s["delta"]) == pytest.approx(s["epsilon"])


def test_a_site_with_a_small_budget_stops_joining_and_nothing_crashes(make_config, tmp_path: Path) -> None:
    """A coordinator that announces one round to some sites and then asks for three: each of them
    calibrated its noise to its whole budget for the one announced round, so it refuses rounds 2
    and 3 (``BudgetExhausted``) and the run goes on without it."""
    def one_round_announced(msg, ctx):  # to finance-1, medical-1, medical-2 (partition ids 0, 2, 3)
        if ctx.node_config["partition-id"] in (0, 2, 3) and "config" in msg.content and "train.rounds" in msg.content["config"]:
            msg.content["config"]["train.rounds"] = 1
        return msg

    budgets = {"finance-1": 2.0, "medical-1": 2.0, "medical-2": 2.0}
    cfg = make_config(tmp_path / "run", train__rounds=3, privacy={"dp": True, "epsilon": 500.0, "budgets": budgets})
    run = run_with(cfg, rewrite=one_round_announced)
    summary = json.loads((run / "summary.json").read_text())
    sites = summary["privacy"]["sites"]
    assert sites["finance-1"]["rounds_joined"] == [1] and sites["finance-1"]["epsilon"] <= budgets["finance-1"]
    assert sites["finance-1"]["budget_epsilon"] == budgets["finance-1"]
    assert sites["finance-2"]["rounds_joined"] == [1, 2, 3]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["cohorts"]["finance"]["sites_refused_budget"] for x in lines[1:]] == [[], ["finance-1"], ["finance-1"]]
    assert [x["cohorts"]["finance"]["sites_trained"] for x in lines[1:]] == [2, 1, 1]
    # medical: every site's budget is spent after round 1, so the cohort stops training but is still evaluated
    assert lines[2]["cohorts"]["medical"]["sites_refused_budget"] == ["medical-1", "medical-2"]
    assert lines[2]["cohorts"]["medical"]["sites_trained"] == 0 and "sites_trained" not in lines[3]["cohorts"]["medical"]
    assert summary["rounds_completed"] == 3

    # the privacy report shows the refusal, and its numbers alone recompute each site's epsilon
    assert main(["privacy-report", str(run)]) == 0
    report = json.loads((run / "privacy.json").read_text())
    f1 = report["sites"]["finance-1"]
    assert f1["rounds_joined"] == [1] and f1["rounds_refused"] == [2, 3] and f1["budget_epsilon"] == budgets["finance-1"]
    assert any("finance-1: refused round(s) [2, 3]" in d for d in report["deviations"])
    for name, s in report["sites"].items():
        assert s["epsilon"] == pytest.approx(sites[name]["epsilon"])
        assert epsilon([Mechanism(s["noise_multiplier"], s["sample_rate"], s["steps"])], s["delta"], s["accountant"]) == pytest.approx(s["epsilon"])
        assert s["epsilon_by_round"][-1][1] == pytest.approx(s["epsilon"])
    assert report["sample_level"]["unit"].startswith("one record") and report["complete"]
    assert (run / "privacy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'src="privacy.png"' in (run / "privacy.html").read_text() and "finance-1" in (run / "privacy.md").read_text()


def test_the_selected_accountant_is_recorded_and_used(make_config, tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "run", train__rounds=1, cohorts={"finance": {"sites": 1}},
                      privacy={"dp": True, "epsilon": 4.0, "accountant": "prv"})
    run, summary = simulate(cfg, progress=False)
    site = summary["privacy"]["sites"]["finance-1"]
    assert site["accountant"] == "prv"
    assert all(e.accountant == "prv" for e in PrivacyLedger.load(run / "privacy_ledger.json").events)
    assert site["epsilon"] <= 4.0
    assert site["epsilon"] == pytest.approx(epsilon([Mechanism(site["noise_multiplier"], site["sample_rate"], site["steps"])],
                                                    site["delta"], "prv"))
