"""The privacy report on hand-made run directories: no noise, client-level DP, restarts, eval releases,
warnings, the catalogue of releases, provenance, the HTML, bad input; epsilon recomputed with dp_accounting."""

from __future__ import annotations

import hashlib
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

import fedlora
from fedlora.cli import main
from fedlora.privacy.accounting import Mechanism, epsilon
from fedlora.privacy.events import ClientDpEvent, DpSgdEvent, EvalNoiseEvent
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.releases import release_catalogue
from fedlora.privacy.report import NOT_RECORDED, SEED_LINE, ReportError, build_report, render_html, render_markdown, write_report

SITES = {"finance": ["bank-1", "bank-2"]}


def _run_dir(tmp_path: Path, events, privacy: str = "dp = true", declarations=None, *, config: str = "", summary=None,
             cohort_metrics=None, sites=None) -> Path:
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(f"[train]\nrounds = 3\nbatch_size = 16\n[privacy]\n{privacy}\n{config}")
    (run / "sites.json").write_text(json.dumps(sites or SITES))
    PrivacyLedger(events, declarations or {}).save(run / "privacy_ledger.json")
    lines = [{"round": r, "cohorts": {c: {"sites_failed": [], "sites_refused_budget": [], **(cohort_metrics or {}).get(c, {})}
                                      for c in (sites or SITES)}} for r in (0, 1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def _dp(round_: int, site: str, sigma: float, q: float = 0.05) -> DpSgdEvent:
    return DpSgdEvent(round=round_, site=site, cohort="finance", noise_multiplier=sigma, sample_rate=q, steps=40, max_grad_norm=1.0)


def _ev(round_: int, site: str, sigma: float = 20.0) -> EvalNoiseEvent:
    return EvalNoiseEvent(round=round_, site=site, cohort="finance", noise_multiplier=sigma)


def test_noise_zero_is_reported_as_no_guarantee(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, [_dp(1, "bank-1", 0.0), _dp(1, "bank-2", 1.0)])
    r = build_report(run)
    assert r["sites"]["bank-1"]["epsilon"] is None and r["sites"]["bank-1"]["guarantee"] == "none (noise multiplier 0)"
    assert r["cohorts"]["finance"]["max_epsilon"] is None
    assert r["sites"]["bank-2"]["epsilon"] == pytest.approx(epsilon([Mechanism(1.0, 0.05, 40)], 1e-5))
    assert "NOT within: bank-1 (no guarantee)" in r["headline"]
    assert any("No guarantee at bank-1" in w for w in r["warnings"])
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
    assert [p[0] for p in s["epsilon_by_round"]] == [1, 2]  # one point per round, after its last release


def test_eval_noise_events_compose_with_dp_sgd_in_epsilon_and_epsilon_by_round(tmp_path: Path) -> None:
    events = [_dp(1, "bank-1", 1.0), _ev(1, "bank-1"), _dp(2, "bank-1", 1.0), _ev(2, "bank-1")]
    s = build_report(_run_dir(tmp_path, events))["sites"]["bank-1"]
    mechs = [Mechanism(1.0, 0.05, 40), Mechanism(20.0, 1.0, 1)] * 2
    assert s["epsilon"] == pytest.approx(epsilon(mechs, 1e-5))
    assert s["epsilon"] > epsilon([Mechanism(1.0, 0.05, 80)], 1e-5)  # the eval releases cost something
    assert s["epsilon_by_round"] == [[1, pytest.approx(epsilon(mechs[:2], 1e-5))], [2, pytest.approx(s["epsilon"])]]
    assert s["steps"] == 80 and s["rounds_joined"] == [1, 2] and s["eval_releases"] == 2 and s["eval_noise_multiplier"] == 20.0
    assert [e["kind"] for e in s["events"]] == ["dp_sgd", "eval_noise", "dp_sgd", "eval_noise"]


def test_epsilon_recomputed_with_dp_accounting_from_the_report_alone_within_one_percent(tmp_path: Path) -> None:
    """Independent figures: Google's dp_accounting RDP accountant (its own orders and conversion) on
    the events privacy.json lists: PoissonSampled(Gaussian) self-composed ``steps`` times, and a
    plain Gaussian per eval release."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    events = [_dp(1, "bank-1", 1.1, 0.04), _ev(1, "bank-1", 15.0), _dp(2, "bank-1", 1.1, 0.04), _ev(2, "bank-1", 15.0),
              DpSgdEvent(round=1, site="bank-2", cohort="finance", noise_multiplier=0.8, sample_rate=0.2, steps=25, max_grad_norm=0.5),
              _ev(1, "bank-2", 5.0)]
    run = _run_dir(tmp_path, events, declarations={"bank-2": {"delta": 1e-6, "delta_rule": "configured"}})
    write_report(run)
    report = json.loads((run / "privacy.json").read_text())
    for name, s in report["sites"].items():
        acc = RdpAccountant()
        for e in s["events"]:
            gauss = dp_accounting.GaussianDpEvent(e["noise_multiplier"])
            if e["kind"] == "dp_sgd":
                acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(e["sample_rate"], gauss), e["steps"]))
            else:
                assert e["kind"] == "eval_noise" and e["sample_rate"] == 1.0 and e["steps"] == 1
                acc.compose(gauss)
        independent = acc.get_epsilon(s["delta"])
        assert s["epsilon"] == pytest.approx(independent, rel=0.01), name
    assert report["sites"]["bank-2"]["delta"] == 1e-6


def test_client_level_epsilon_and_the_effective_noise_after_dropouts(tmp_path: Path) -> None:
    events = [ClientDpEvent(round=1, cohort="finance", noise_multiplier=1.0, sample_rate=0.5, clip_norm=0.1, noised_by="sites"),
              ClientDpEvent(round=2, cohort="finance", noise_multiplier=0.5 ** 0.5, sample_rate=0.5, clip_norm=0.1, noised_by="sites")]
    run = _run_dir(tmp_path, events, privacy='client_dp = true\nclient_noise = "sites"',
                   declarations={"cohort:finance": {"delta": 1e-4, "delta_rule": "configured"}})
    r = build_report(run)
    cl = r["cohorts"]["finance"]["client_level"]
    assert cl["epsilon"] == pytest.approx(epsilon([Mechanism(1.0, 0.5, 1), Mechanism(0.5 ** 0.5, 0.5, 1)], 1e-4))
    assert "share" in r["client_level"]["noised_by"]
    assert cl["adjacency"] == "zero-out" and r["client_level"]["adjacency"].startswith("zero-out")
    assert any("secure aggregation is off" in d for d in r["deviations"])
    assert any("client-level noise below" in d and "0.7071" in d for d in r["deviations"])
    assert "client-level epsilon finance" in r["headline"]


def test_headline_says_all_sites_within_budget_and_delta_and_the_guarantee_in_plain_words(tmp_path: Path) -> None:
    decl = {s: {"delta": 1e-5, "delta_rule": "default 1e-5 (below 1/(10 n))", "budget_epsilon": 8.0} for s in ("bank-1", "bank-2")}
    run = _run_dir(tmp_path, [_dp(1, "bank-1", 1.0), _dp(1, "bank-2", 1.2)], declarations=decl, summary={})
    r = build_report(run)
    assert r["headline"].startswith("All 2 DP sites within epsilon 8, delta 1e-5")
    assert r["sample_level"]["adjacency"].startswith("add or remove one record")
    assert "Renyi" in r["sample_level"]["accounting"] and "Poisson" in r["sample_level"]["sampling"]
    assert r["hyperparameter_tuning"] == NOT_RECORDED
    assert "built from what the sites attest" in r["attestation"]
    md = render_markdown(r)
    assert md.splitlines()[0] == "# Privacy report: run" and md.splitlines()[2] == f"**{r['headline']}**"
    assert "| 1e-5 | default 1e-5 (below 1/(10 n)) |" in md and "1e-05" not in md  # delta and its rule: two cells
    over = _run_dir(tmp_path / "over", [_dp(1, "bank-1", 0.3)], declarations={"bank-1": {"budget_epsilon": 1.0}}, summary={})
    ro = build_report(over)
    assert "0 of 1 DP sites within their budgets" in ro["headline"] and "NOT within: bank-1 (epsilon" in ro["headline"]
    assert any(w.startswith("Above budget: bank-1") for w in ro["warnings"])


def test_hyperparameter_tuning_is_stated_when_the_config_says(tmp_path: Path) -> None:
    r = build_report(_run_dir(tmp_path, [_dp(1, "bank-1", 1.0)], privacy="dp = true\ntuned_on_private_data = false"))
    assert r["hyperparameter_tuning"] == "tuned on private data: no (as the config states)"


def test_warnings_q1_tiny_site_clear_cohort_and_majority_baseline(tmp_path: Path) -> None:
    decl = {"bank-2": {"public_size": 40}}
    summary = {"cohorts": {"finance": {"accuracy": 0.595, "majority_baseline": 0.591, "secure_aggregation": True}}}
    run = _run_dir(tmp_path, [_dp(1, "bank-1", 1.0, q=1.0), _dp(1, "bank-2", 1.0, q=0.4)], declarations=decl, summary=summary,
                   cohort_metrics={"finance": {"secure_aggregation": False}})
    r = build_report(run)
    w = "\n".join(r["warnings"])
    assert "No amplification by sampling at bank-1" in w and "bank-2" not in w.split("No amplification")[1].split("\n")[0]
    assert "Tiny sites" in w and "bank-2 (40, declared)" in w and "bank-1 (16, at most, as q = 1)" in w
    assert "Aggregated in the clear: cohort(s) finance" in w  # metrics.jsonl says so, whatever summary.json says
    assert "DP utility at or below the majority baseline: finance (accuracy 0.595, majority 0.591)" in w
    c = r["cohorts"]["finance"]
    assert c["accuracy"] == 0.595 and c["majority_baseline"] == 0.591 and c["at_majority_baseline"] is True
    assert "aggregated in the clear: finance" in r["headline"] and "at the majority baseline: finance" in r["headline"]
    # the catalogue for a cohort in the clear: the coordinator sees each site's update
    update = next(x for g in r["release_groups"] for x in g["releases"] if x["name"] == "train.update")
    assert update["visibility"] == "per site" and update["status"] == "accounted"
    good = _run_dir(tmp_path / "good", [_dp(1, "bank-1", 1.0)],
                    summary={"cohorts": {"finance": {"accuracy": 0.75, "majority_baseline": 0.59, "secure_aggregation": True}}})
    rg = build_report(good)
    assert rg["cohorts"]["finance"]["at_majority_baseline"] is False and not any("majority" in x for x in rg["warnings"])
    assert "every cohort securely aggregated" in rg["headline"]


def test_reproducible_noise_is_the_first_line_and_nothing_is_accounted(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, [_dp(1, "bank-1", 1.0)], privacy="dp = true\nreproducible_noise = true")
    r = build_report(run)
    assert r["headline"].lower().startswith(SEED_LINE) and r["reproducible_noise"]
    assert r["warnings"][0].lower().startswith(SEED_LINE)
    assert SEED_LINE in render_markdown(r).splitlines()[0]
    assert r["releases_by_status"]["accounted"] == [] and "train.update" in r["releases_by_status"]["no guarantee"]
    declared = _run_dir(tmp_path / "d", [_dp(1, "bank-1", 1.0)], declarations={"bank-1": {"noise": "reproducible"}})
    assert build_report(declared)["headline"].lower().startswith(SEED_LINE)  # a site that says so is believed


def test_every_release_is_listed_under_its_status_and_site_declarations_are_shown(tmp_path: Path) -> None:
    decl = {"bank-1": {"policy": {"public_size": 500, "eval_metrics": "public"}, "noise": "secret", "attested_by": "site"}}
    run = _run_dir(tmp_path, [_dp(1, "bank-1", 1.0), _dp(1, "bank-2", 1.0)], declarations=decl, privacy='dp = true\neval_metrics = "noised"',
                   config='[secure_aggregation]\nenabled = true\nmetrics = "secure"\n')
    r = build_report(run)
    expected = release_catalogue({"dp": True, "eval_metrics": "noised"}, {"enabled": True, "metrics": "secure"})
    assert [x["name"] for x in r["releases"]] == [x.name for x in expected]
    assert sorted(n for names in r["releases_by_status"].values() for n in names) == sorted(x.name for x in expected)
    groups = {tuple(g["sites"]): {x["name"]: x for x in g["releases"]} for g in r["release_groups"]}
    assert groups[("bank-1",)]["evaluate.metrics"]["status"] == "no guarantee"  # its own policy releases them in public
    assert groups[("bank-2",)]["evaluate.metrics"]["status"] == "accounted"
    assert r["sites"]["bank-1"]["policy"] == {"public_size": 500, "eval_metrics": "public"} and r["sites"]["bank-1"]["attested_by"] == "site"
    assert r["sites"]["bank-1"]["public_size_records"] == 500
    md = render_markdown(r)
    assert "| bank-1 | 500 | public | secret | site | none |" in md
    assert "## What each site releases to the coordinator" in md and "| no guarantee | evaluate.metrics |" in md


def test_provenance_version_config_hash_and_date(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, [_dp(1, "bank-1", 1.0)], summary={})
    p = build_report(run)["provenance"]
    assert p["fedlora_version"] == fedlora.__version__
    assert p["config_sha256"] == hashlib.sha256((run / "config.toml").read_bytes()).hexdigest()
    assert p["date_source"] == "summary.json written" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", p["date"])
    (run / "summary.json").unlink()
    assert build_report(run)["provenance"]["date_source"].startswith("report built")


class _Html(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.cells: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append(tag)
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_html_has_the_title_first_real_tables_and_no_python_lists_in_cells(tmp_path: Path) -> None:
    decl = {"bank-1": {"delta": 1e-5, "delta_rule": "default 1e-5 (below 1/(10 n))", "budget_epsilon": 8.0}}
    run = _run_dir(tmp_path, [_dp(1, "bank-1", 1.0), _dp(2, "bank-1", 1.0)], declarations=decl)
    paths = write_report(run)
    assert [p.name for p in paths] == ["privacy.json", "privacy.md", "privacy.png", "privacy.html"]
    page = (run / "privacy.html").read_text()
    parsed = _Html()
    parsed.feed(page)
    body = parsed.tags[parsed.tags.index("body") + 1:]
    assert body[0] == "h1" and body.index("h1") < body.index("img")
    assert parsed.tags.count("table") >= 5 and "th" in parsed.tags and "thead" in parsed.tags
    assert parsed.cells and not [c for c in parsed.cells if re.search(r"\[.*\]", c)]
    assert "1, 2" in parsed.cells and "none" in parsed.cells  # rounds joined, rounds refused
    assert "1e-5" in parsed.cells and "default 1e-5 (below 1/(10 n))" in parsed.cells  # delta and its rule: two cells
    assert not [c for c in parsed.cells if c.startswith("1e-05") or "(default" in c]
    assert not re.search(r"<t[dh]>\s*\|", page)  # no markdown rows turned into cells
    assert render_html(build_report(run), None).count("<img") == 0


def test_a_directory_that_is_not_a_run_is_refused_with_its_name(tmp_path: Path, capsys) -> None:
    with pytest.raises(ReportError, match="not a fedlora run directory"):
        build_report(tmp_path)
    assert main(["privacy-report", str(tmp_path)]) == 2
    assert "not a fedlora run directory" in capsys.readouterr().err


def test_small_numbers_read_with_an_exponent_whatever_their_digits() -> None:
    from fedlora.privacy.report import _num

    # 0.000915 (a budget left) once crashed the report: ".2g" writes it without an exponent
    assert [_num(x) for x in (0.000915, 1e-5, 2.5e-6, 0.0001, 0.5, 3.0)] == ["9.2e-4", "1e-5", "2.5e-6", "1e-4", "0.5", "3"]
