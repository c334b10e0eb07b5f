"""Checkpoint and resume: a run stopped after a round and resumed ends exactly like one that never stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedlora.simulation.runner as runner
from conftest import interrupt_before
from fedlora.cli import main
from fedlora.errors import ConfigError, RunInterrupted
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.report import build_report


def _stable(line: dict) -> dict:
    """A metrics line without its timings."""
    return {"round": line["round"], "cohorts": {c: {k: v for k, v in e.items() if "seconds" not in k} for c, e in line["cohorts"].items()}}


@pytest.mark.parametrize("privacy", [{"dp": True, "epsilon": 6.0, "reproducible_noise": True}, {"dp": True, "epsilon": 6.0},
                                     {"client_dp": True, "adaptive_clip": True}], ids=["dp-sgd-seeded", "dp-sgd-secret", "client-dp"])
def test_a_resumed_run_equals_one_that_never_stopped(make_config, tmp_path: Path, monkeypatch, privacy: dict) -> None:
    """Exact where the noise is reproducible (seeded research noise, the coordinator's own client-level
    noise); with the sites' secret noise a resumed DP run continues correctly instead: the same
    ledger, the same budget and epsilon, but fresh noise, so other adapters."""
    exact = not (privacy.get("dp") and not privacy.get("reproducible_noise"))
    over = dict(train__rounds=3, privacy=privacy, federation={"site_sample_rate": 0.75})
    straight, expected = runner.simulate(make_config(tmp_path / "straight", **over), progress=False)

    with monkeypatch.context() as m:
        interrupt_before(3, m)
        with pytest.raises(RunInterrupted, match="--resume"):
            runner.simulate(make_config(tmp_path / "stopped", **over), progress=False)
    stopped = tmp_path / "stopped"
    assert not (stopped / "summary.json").exists()
    assert json.loads((stopped / "checkpoint" / "state.json").read_text())["round"] == 2
    partial = build_report(stopped)  # the report works on a stopped (or running) run
    assert not partial["complete"] and partial["rounds_completed"] == 2
    assert any("2 of 3 rounds" in d for d in partial["deviations"])

    run, summary = runner.resume(stopped, progress=False)
    assert summary["resumed_after_round"] == 2 and summary["rounds_completed"] == 3
    for cohort in ("finance", "medical"):
        a = (straight / "adapters" / cohort / "adapter_model.safetensors").read_bytes()
        assert (a == (run / "adapters" / cohort / "adapter_model.safetensors").read_bytes()) == exact
        if exact:
            assert summary["cohorts"][cohort]["accuracy"] == expected["cohorts"][cohort]["accuracy"]
    assert summary["privacy"] == expected["privacy"]  # epsilon per site / cohort, rounds joined, noise
    events = lambda p: [e for e in PrivacyLedger.load(p / "privacy_ledger.json").events]  # noqa: E731
    assert events(run) == events(straight)
    lines = lambda p: [_stable(json.loads(x)) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    if exact:
        assert lines(run) == lines(straight)
    else:  # the same rounds, sites and counts; other (freshly noised) values
        keys = lambda ls: [{c: sorted(e) for c, e in x["cohorts"].items()} for x in ls]  # noqa: E731
        assert keys(lines(run)) == keys(lines(straight))


def test_resume_refuses_what_it_cannot_continue(make_config, tmp_path: Path, capsys) -> None:
    done, _ = runner.simulate(make_config(tmp_path / "done", train__rounds=1), progress=False)
    with pytest.raises(ConfigError, match="completed run"):
        runner.resume(done, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a fedlora run directory"):
        runner.resume(tmp_path / "empty", progress=False)
    assert main(["simulate", "--resume", str(done), "--rounds", "3"]) == 2
    assert "cannot be combined with --resume" in capsys.readouterr().err
