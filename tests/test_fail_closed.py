"""Secure aggregation fails closed (DESIGN.md section 7): nothing a site trained reaches the
coordinator in the clear unless both sides allow it.

* The coordinator: with secure aggregation on, a cohort with fewer than ``min_sites`` sites at
  discovery is skipped for the run (its sites are sent nothing), named in every metrics line, in
  summary.json and in the privacy report, and the CLI exits non-zero (``INCOMPLETE_EXIT``); every
  cohort skipped stops the run before any round. ``allow_clear`` (``--allow-clear-aggregation``)
  aggregates such a cohort in the clear, warning loudly.
* The site: a policy that requires secure aggregation (the default) refuses, with code 4203 and
  before reading data, training or charging any budget, a ``train`` without a secure-aggregation
  setup, and an ``evaluate`` without one unless its metrics stay at the site.
* Config time: a k or an explicit threshold the sites would refuse is refused before anything is
  written. A re-asked round is refused before training (no budget, no compute).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from fedlora.cli import check_complete, main
from fedlora.client import app as client_app_module
from fedlora.client.secagg_site import SENT_KEY, SentSums, SumOf
from fedlora.client.site import SiteSpec
from fedlora.config import ConfigError, SecureAggregationConfig
from fedlora.errors import INCOMPLETE_EXIT, POLICY_REFUSED_CODE, FederationError, RunIncomplete
from fedlora.privacy.report import build_report
from fedlora.privacy.secagg import threshold_floor
from fedlora.protocol import EvalKept, EvalMetrics, SecAggSetup, TrainMetrics
from fedlora.server.secure_round import plan
from fedlora.simulation.runner import plan_sites, simulate, site_policy
from test_privacy_review_attacks import COHORT, Harness, _call, _ok, h  # noqa: F401 - h is the handler-level fixture

SECAGG = {"enabled": True, "bits": 20, "clip_range": 1.0}  # fail closed: allow_clear off
THREE_AND_THREE = {"finance": {"sites": 3}, "medical": {"sites": 3}}


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _wrong_labels_file(root: Path) -> Path:
    """A finance file whose labels are not finance's: a site reading it fails at train."""
    path = root / "wrong-labels.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("text,label\n" + "".join(f"row {i},label-{i % 2}\n" for i in range(20)))
    return path


def _run_scenario(cfg, root: Path) -> tuple[Path | None, list[tuple[str, int, object]], Exception | None]:
    """The issue's scenario in a real in-process federation: of finance's 3 sites, finance-1 says it
    belongs to another domain (ignored at discovery) and finance-2 holds data with the wrong
    labels (fails at train). Returns the run directory, every (message type, partition id, reply)
    the sites sent, and the error the run stopped with (None if it finished)."""
    from fedlora.client.app import make_client_app
    from fedlora.privacy.key_signing import InMemoryCA
    from fedlora.server.app import make_server_app
    from fedlora.server.rundir import RunDir
    from fedlora.simulation.runner import _write_demo_data, run_engine, with_credentials

    p = plan_sites(cfg)
    run_dir = RunDir.start(cfg)
    sites = _write_demo_data(cfg, p, run_dir)
    bad = _wrong_labels_file(root)
    wrong = {"finance-1": {"cohort": "retail"}, "finance-2": {"data_path": str(bad)}}
    sites = [replace(s, **wrong.get(s.name, {})) for s in sites]
    ca = InMemoryCA()
    sites = with_credentials(sites, ca)
    real = make_client_app(sites, device="cpu")
    seen: list[tuple[str, int, object]] = []

    def client(msg, ctx):
        reply = real(msg, ctx)
        seen.append((msg.metadata.message_type, int(ctx.node_config["partition-id"]), reply))
        return reply

    server = make_server_app(cfg, run_dir, p.labels, expected_sites=len(sites), progress=False, ca_pem=ca.pem)
    try:
        run_engine(cfg, sites, server, client)
    except FederationError as e:
        return run_dir.path, seen, e
    return run_dir.path, seen, None


def _clear_releases(seen) -> list[tuple[str, int]]:
    """Every reply that carried an update, train metrics or eval metrics in the clear."""
    return [(kind, part) for kind, part, reply in seen if not reply.has_error()
            and any(k in reply.content for k in ("update", TrainMetrics.record, EvalMetrics.record))]


# ---- the coordinator: a cohort too small is skipped, never aggregated in the clear ------------------

def test_malicious_wrong_domain_and_wrong_labels_leave_no_clear_update_and_the_cohort_is_skipped(
        make_config, tmp_path: Path, caplog) -> None:
    cfg = make_config(tmp_path / "run", cohorts=THREE_AND_THREE, train__rounds=1, secure_aggregation=SECAGG)
    run, seen, error = _run_scenario(cfg, tmp_path)
    assert error is None
    assert _clear_releases(seen) == []  # nothing reached the coordinator in the clear
    # finance's sites (partitions 0-2) were asked who they are, and nothing else
    assert {kind for kind, part, _ in seen if part < 3} == {"query"}
    assert any(kind == "train.secagg_masked" for kind, part, _ in seen if part >= 3)  # medical trained securely
    for line in _lines(run):
        assert "fewer than secure_aggregation.min_sites = 3" in line["cohorts"]["finance"]["skipped"]
        assert set(line["cohorts"]["finance"]) == {"skipped"}
    assert _lines(run)[1]["cohorts"]["medical"]["sites_trained"] == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["cohorts_skipped"] == ["finance"]
    fin = summary["cohorts"]["finance"]
    assert fin["skipped"] and fin["adapter"] is None and fin["accuracy"] is None and fin["secure_aggregation"] is None
    assert summary["cohorts"]["medical"]["secure_aggregation"] is True
    assert not (run / "adapters" / "finance").exists() and (run / "adapters" / "medical").is_dir()
    assert "cohort 'finance' is SKIPPED for this run" in caplog.text and "--allow-clear-aggregation" in caplog.text
    with pytest.raises(RunIncomplete, match="cohort\\(s\\) finance were skipped") as e:  # what the CLI exits with
        check_complete(summary)
    assert e.value.exit_code == INCOMPLETE_EXIT != 0
    report = build_report(run)
    assert report["cohorts_skipped"] == ["finance"] and report["cohorts"]["finance"]["skipped"]
    assert report["cohorts"]["finance"]["secure_aggregation"] is None
    assert "SKIPPED" in report["headline"] and "finance" in report["headline"]
    assert "aggregated in the clear" not in report["headline"]
    assert any(w.startswith("Skipped, nothing trained or released") for w in report["warnings"])
    assert any(g.get("skipped") and g["releases"] == [] for g in report["release_groups"])


def test_malicious_the_scenario_with_only_the_short_cohort_stops_before_any_round(make_config, tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "run", cohorts={"finance": {"sites": 3}}, train__rounds=1, secure_aggregation=SECAGG)
    run, seen, error = _run_scenario(cfg, tmp_path)
    assert isinstance(error, FederationError) and error.exit_code != 0
    assert "every cohort would be skipped" in str(error) and "cohort finance" in str(error) and "--allow-clear-aggregation" in str(error)
    assert {kind for kind, _, _ in seen} == {"query"} and _clear_releases(seen) == []
    assert not (run / "metrics.jsonl").exists()


def test_allow_clear_restores_the_clear_path_with_a_loud_warning(make_config, tmp_path: Path, caplog) -> None:
    cfg = make_config(tmp_path / "run", cohorts={"finance": {"sites": 3}}, train__rounds=1,
                      secure_aggregation={**SECAGG, "allow_clear": True})
    assert all(not s.policy.require_secure_aggregation for s in plan_sites(cfg).sites)  # the simulated sites follow the run
    run, seen, error = _run_scenario(cfg, tmp_path)
    assert error is None
    assert ("train", 2) in _clear_releases(seen)  # finance-3's update, in the clear, as asked
    assert "IN THE CLEAR" in caplog.text
    summary = json.loads((run / "summary.json").read_text())
    assert summary["cohorts_skipped"] == [] and summary["cohorts"]["finance"]["secure_aggregation"] is False
    check_complete(summary)  # nothing skipped: exit 0


def test_simulated_sites_require_secure_aggregation_unless_it_is_off_or_clear_is_allowed(make_config, tmp_path: Path) -> None:
    on = make_config(tmp_path / "a", cohorts={"finance": {"sites": 3}}, secure_aggregation=SECAGG)
    off = make_config(tmp_path / "b", cohorts={"finance": {"sites": 3}}, secure_aggregation={"enabled": False})
    clear = make_config(tmp_path / "c", cohorts={"finance": {"sites": 3}}, secure_aggregation={**SECAGG, "allow_clear": True})
    assert [site_policy(c, "finance-1").require_secure_aggregation for c in (on, off, clear)] == [True, False, False]
    node = {"domain": "finance", "data-path": "x.csv"}
    assert SiteSpec.from_node_config(node).policy.require_secure_aggregation  # a deployed site: required unless it says otherwise
    assert not SiteSpec.from_node_config({**node, "allow-clear-aggregation": "true"}).policy.require_secure_aggregation
    with pytest.raises(ConfigError, match="allow-clear-aggregation"):
        SiteSpec.from_node_config({**node, "allow-clear-aggregation": "maybe"})


def test_every_cohort_too_small_is_refused_before_anything_is_written(make_config, tmp_path: Path, capsys) -> None:
    with pytest.raises(FederationError, match="every cohort would be skipped.*cohort finance.*cohort medical.*--allow-clear-aggregation"):
        simulate(make_config(tmp_path / "run", secure_aggregation=SECAGG), progress=False)  # 2 cohorts of 2 sites
    assert not (tmp_path / "run").exists()


def test_the_cli_refuses_a_run_whose_only_cohort_is_too_small_and_the_flag_restores_clear(tiny_model: Path, tmp_path: Path, capsys) -> None:
    base = (f'[model]\nsource = "{tiny_model}"\nmax_length = 32\n[train]\nrounds = 1\nlocal_steps = 2\n[privacy]\ndp = false\n'
            '[demo]\nexamples_per_site = 30\n')
    cfg = tmp_path / "run.toml"
    cfg.write_text(base + '[cohorts.retail]\nsites = 2\n')
    assert main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "a"), "--quiet"]) == 6  # the only cohort: nothing to run
    err = capsys.readouterr().err
    assert "cohort retail" in err and "--allow-clear-aggregation" in err and not (tmp_path / "a").exists()
    assert main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "b"), "--quiet", "--allow-clear-aggregation"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: --allow-clear-aggregation" in err and "IN THE CLEAR" in err
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["cohorts"]["retail"]["secure_aggregation"] is False


# ---- the site: never an update or a metric in the clear ---------------------------------------------

def _forbid_work(monkeypatch) -> list[str]:
    """Record any data read, training or DP charge the handlers start (there must be none)."""
    calls: list[str] = []
    for name in ("site_data", "train_local", "private_round", "private_eval_noise", "evaluate_local"):
        def spy(*a, _name=name, **k):
            calls.append(_name)
            raise AssertionError(f"{_name} was called")
        monkeypatch.setattr(client_app_module, name, spy)
    return calls


def _state_files(site: SiteSpec) -> list[Path]:
    root = Path(site.state_dir)
    return sorted(root.rglob("*")) if root.exists() else []


def test_malicious_coordinator_asking_a_clear_update_is_refused_4203_before_training(h: Harness, monkeypatch) -> None:  # noqa: F811
    site = h.site("clear-train", require_secure_aggregation=True)
    calls = _forbid_work(monkeypatch)
    reply = _call(h.app(site), h.msg("train"), h.ctx())
    assert not _ok(reply) and reply.error.code == POLICY_REFUSED_CODE, reply
    assert "requires secure aggregation" in reply.error.reason and "--allow-clear-aggregation" in reply.error.reason
    assert calls == [] and _state_files(site) == []  # nothing read, trained or charged: no ledger event written


@pytest.mark.parametrize("policy, ask", [({"eval_metrics": "noised"}, {"eval_metrics": "noised"}),
                                         ({"epsilon": 0.0}, {"dp": False})], ids=["noised", "public"])
def test_malicious_coordinator_asking_clear_eval_metrics_is_refused_4203_before_evaluating(
        h: Harness, monkeypatch, policy: dict, ask: dict) -> None:  # noqa: F811
    site = h.site("clear-eval", require_secure_aggregation=True, **policy)
    calls = _forbid_work(monkeypatch)
    reply = _call(h.app(site), h.msg("evaluate", ask=ask), h.ctx())
    assert not _ok(reply) and reply.error.code == POLICY_REFUSED_CODE, reply
    assert "eval metrics in the clear" in reply.error.reason
    assert calls == [] and _state_files(site) == []


def test_eval_metrics_kept_at_the_site_need_no_secure_aggregation(h: Harness) -> None:  # noqa: F811
    site = h.site("kept-eval", require_secure_aggregation=True)  # DP, eval metrics "site"
    reply = _call(h.app(site), h.msg("evaluate"), h.ctx())
    assert _ok(reply), reply
    assert EvalKept.record in reply.content and EvalMetrics.record not in reply.content


def test_a_site_that_allows_clear_aggregation_trains_in_the_clear(h: Harness) -> None:  # noqa: F811
    site = h.site("allowed", require_secure_aggregation=False)
    reply = _call(h.app(site), h.msg("train"), h.ctx())
    assert _ok(reply) and "update" in reply.content


def test_malicious_a_re_asked_round_is_refused_before_training(h: Harness, monkeypatch) -> None:  # noqa: F811
    """The site already sent its masked input for (finance, round 1, train): the same round asked
    again under another round id is refused before any data is read or budget charged."""
    site = h.site("early-replay", require_secure_aggregation=True)
    ctx = h.ctx()
    sent = SentSums()
    sent.add("finance/1", SumOf(COHORT, 1, "train"), None)
    sent.save(ctx, None)
    calls = _forbid_work(monkeypatch)
    setup = SecAggSetup(round_id="finance/1/again", threshold=3, modulus_bits=24, neighbours=(1002, 1003, 1004), bits=16,
                        clip_range=1.0, weight_scale=1000.0)
    reply = _call(h.app(site), h.msg(secagg=setup), ctx)
    assert not _ok(reply) and "already sent a masked input for cohort 'finance' round 1 (train)" in reply.error.reason
    assert calls == [] and _state_files(site) == []
    assert SENT_KEY in ctx.state  # the record it refused by is untouched


# ---- config time: what every site would refuse is refused before anything is written -------------------

def test_a_threshold_below_the_sites_floor_is_refused_before_anything_is_written(make_config, tmp_path: Path) -> None:
    assert threshold_floor(3) == 3
    cfg = make_config(tmp_path / "run", cohorts={"finance": {"sites": 4}}, secure_aggregation={**SECAGG, "threshold": 2})
    with pytest.raises(ConfigError, match=r"cohort finance \(4 sites\).*threshold t = 2 is below the sites' floor 3 for k = 3"):
        simulate(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_the_cli_refuses_a_low_threshold_with_exit_2(tiny_model: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\nsource = "{tiny_model}"\n[cohorts.finance]\nsites = 4\n[secure_aggregation]\nthreshold = 2\n')
    assert main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "floor 3" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("neighbours, n", [(1, 5), (0, 2)])
def test_too_few_neighbours_are_refused_at_plan_time(neighbours: int, n: int) -> None:
    with pytest.raises(ValueError, match="k = 1 neighbour.*below the minimum 2"):
        plan(SecureAggregationConfig(neighbours=neighbours, min_sites=2), n)


def test_the_automatic_threshold_is_never_below_the_sites_floor() -> None:
    for n in range(3, 200):
        for k_cfg in (0, 2, 3, 4, 5, 7):
            k, t, _ = plan(SecureAggregationConfig(neighbours=k_cfg), n)
            assert threshold_floor(k) <= t <= k + 1, (n, k_cfg, k, t)
