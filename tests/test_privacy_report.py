"""The privacy report on hand-made run directories: no noise, client-level DP, restarts, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.privacy.accounting import Mechanism, epsilon
from fedlora.privacy.events import ClientDpEvent, DpSgdEvent
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.report import ReportError, build_report, write_report


def _run_dir(tmp_path: Path, events, privacy: str = "dp = true", declarations=None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(f"[train]\nrounds = 3\n[privacy]\n{privacy}\n")
    (run / "sites.json").write_text(json.dumps({"finance": ["bank-1", "bank-2"]}))
    PrivacyLedger(events, declarations or {}).save(run / "privacy_ledger.json")
    lines = [{"round": r, "cohorts": {"finance": {"sites_failed": [], "sites_refused_budget": []}}} for r in (0, 1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def _dp(round_: int, site: str, sigma: float) -> DpSgdEvent:
    return DpSgdEvent(round=round_, site=site, cohort="finance", noise_multiplier=sigma, sample_rate=0.05, steps=40, max_grad_norm=1.0)


def test_noise_zero_is_reported_as_no_guarantee(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, [_dp(1, "bank-1", 0.0), _dp(1, "bank-2", 1.0)])
    r = build_report(run)
    assert r["sites"]["bank-1"]["epsilon"] is None and r["sites"]["bank-1"]["guarantee"] == "none (noise multiplier 0)"
    assert r["cohorts"]["finance"]["max_epsilon"] is None
    assert r["sites"]["bank-2"]["epsilon"] == pytest.approx(epsilon([Mechanism(1.0, 0.05, 40)], 1e-5))
    write_report(run)
    json.loads((run / "privacy.json").read_text())  # strict JSON: no Infinity
    assert "inf (no guarantee)" in (run / "privacy.md").read_text()


def test_declared_delta_and_budget_are_used_and_a_twice_trained_round_is_charged_and_named(tmp_path: Path) -> None:
    decl = {"bank-1": {"delta": 1e-6, "delta_rule": "configured", "budget_epsilon": 5.0}}
    run = _run_dir(tmp_path, [_dp(1, "bank-1", 1.0), _dp(2, "bank-1", 1.0), _dp(2, "bank-1", 1.0)], declarations=decl)
    s = build_report(run)["sites"]["bank-1"]
    assert s["delta"] == 1e-6 and s["budget_epsilon"] == 5.0 and s["steps"] == 120
    assert s["epsilon"] == pytest.approx(epsilon([Mechanism(1.0, 0.05, 120)], 1e-6))
    assert [e for e in build_report(run)["deviations"] if "trained more than once" in e]
    assert s["budget_left"] == pytest.approx(max(0.0, 5.0 - s["epsilon"]))


def test_client_level_epsilon_and_the_effective_noise_after_dropouts(tmp_path: Path) -> None:
    events = [ClientDpEvent(round=1, cohort="finance", noise_multiplier=1.0, sample_rate=0.5, clip_norm=0.1, noised_by="sites"),
              ClientDpEvent(round=2, cohort="finance", noise_multiplier=0.5 ** 0.5, sample_rate=0.5, clip_norm=0.1, noised_by="sites")]
    run = _run_dir(tmp_path, events, privacy='client_dp = true\nclient_noise = "sites"',
                   declarations={"cohort:finance": {"delta": 1e-4, "delta_rule": "configured"}})
    r = build_report(run)
    cl = r["cohorts"]["finance"]["client_level"]
    assert cl["epsilon"] == pytest.approx(epsilon([Mechanism(1.0, 0.5, 1), Mechanism(0.5 ** 0.5, 0.5, 1)], 1e-4))
    assert "share" in r["client_level"]["noised_by"]
    assert any("secure aggregation is off" in d for d in r["deviations"])
    assert any("client-level noise below" in d and "0.7071" in d for d in r["deviations"])


def test_a_directory_that_is_not_a_run_is_refused_with_its_name(tmp_path: Path, capsys) -> None:
    with pytest.raises(ReportError, match="not a fedlora run directory"):
        build_report(tmp_path)
    assert main(["privacy-report", str(tmp_path)]) == 2
    assert "not a fedlora run directory" in capsys.readouterr().err
