"""``fedlora privacy-report --site STATE_DIR``: one site's own account of what it spent, from its own folder.

The run report (``fedlora.privacy.report``) is the coordinator's: it is built from what the sites
attested. This one is the site's: it reads only the site's state folder (``fedlora client
--state-dir``; in simulation ``RUN_DIR/site_state/<site>``), where ``fedlora.client.privacy_site``
keeps the one ledger every run on that site spends from (``privacy.json``: the ledger's events
and the noise calibration), and recomputes epsilon from the events, as the site itself does
before every release: every sample-level event of the ledger counts, whatever site name or key
identity it was recorded under (the ledger belongs to this site alone).

Per cohort it shows what that cohort's releases cost on their own and per round the epsilon
spent so far (cumulative over everything the site released). Delta and the budget are the
site's own policy: the ledger's declaration for the site when it holds one, else the
``delta`` / ``budget_epsilon`` given (``--delta``, ``--epsilon``: what the site passed to
``fedlora client``); without either, delta 1e-5 is assumed and the report says so.

Outputs: ``site-privacy.json`` and ``site-privacy.md`` (never ``privacy.json``: in a state folder
that name is the ledger itself).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from .events import DpSgdEvent, EvalNoiseEvent
from .ledger import PrivacyLedger
from .report import ReportError, _eps, _num, _table, markdown_blocks
from .summary import DEFAULT_DELTA, site_spend

SITE_REPORT_FORMAT = "fedlora-site-privacy-report/1"
STATE_FILE = "privacy.json"  # client/privacy_site.state_file
OUTPUTS = ("site-privacy.json", "site-privacy.md")


def load_site_state(state_dir: str | Path) -> tuple[PrivacyLedger, dict[str, Any]]:
    """The site's ledger and calibration from ``STATE_DIR/privacy.json``; ``ReportError`` naming
    the folder when it holds no ledger, or the file when it cannot be read."""
    folder = Path(state_dir)
    if not folder.is_dir():
        raise ReportError(f"{folder}: no such folder (a site's state folder: fedlora client --state-dir)")
    path = folder / STATE_FILE
    if not path.is_file():
        raise ReportError(f"{folder} holds no privacy ledger ({STATE_FILE} not found): not a site's state folder, or the site "
                          "has released nothing under DP yet")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        ledger = PrivacyLedger.from_json(doc["ledger"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ReportError(f"{path}: not a site's privacy ledger: {e}") from None
    return ledger, dict(doc.get("calibration") or {})


def _declared(ledger: PrivacyLedger, names: list[str], identities: list[str]) -> dict[str, Any]:
    """The ledger's declaration for this site (under its identity or one of its names), if any."""
    decl = ledger.declarations
    return next((dict(decl[k]) for k in [*identities, *reversed(names)] if k in decl), {})


def build_site_report(state_dir: str | Path, *, budget_epsilon: float | None = None, delta: float | None = None) -> dict[str, Any]:
    """The site's report (module docstring) as a JSON-ready dict."""
    folder = Path(state_dir)
    ledger, calibration = load_site_state(folder)
    events = [e for e in ledger.events if isinstance(e, (DpSgdEvent, EvalNoiseEvent))]
    names = list(dict.fromkeys(e.site for e in events))
    identities = list(dict.fromkeys(e.identity for e in events if e.identity))
    declared = _declared(ledger, names, identities)
    if delta is not None and delta > 0:
        facts = {"delta": float(delta), "delta_rule": "given (--delta)"}
    elif "delta" in declared:
        facts = {"delta": float(declared["delta"]), "delta_rule": declared.get("delta_rule", "declared in the site's ledger")}
    else:
        facts = {"delta": DEFAULT_DELTA, "delta_rule": f"not recorded in the site's ledger: {DEFAULT_DELTA:g} assumed (pass "
                                                      "--delta, the site's largest delta)"}
    budget = budget_epsilon if budget_epsilon is not None and budget_epsilon > 0 else declared.get("budget_epsilon")
    facts["budget_epsilon"] = budget
    facts["budget_source"] = ("given (--epsilon)" if budget_epsilon is not None and budget_epsilon > 0 else
                              "declared in the site's ledger" if budget is not None else "not recorded (pass --epsilon)")
    site = names[-1] if names else folder.resolve().name

    def spend(of: list[DpSgdEvent | EvalNoiseEvent]) -> dict[str, Any] | None:
        """``site_spend`` of these events, all under one name (they are all this site's)."""
        return site_spend(PrivacyLedger([replace(e, site=site) for e in of], {site: facts}), site)

    total = spend(events)
    report: dict[str, Any] = {
        "format": SITE_REPORT_FORMAT, "state_dir": str(folder.resolve()), "site": site, "names": names, "identities": identities,
        "delta": facts["delta"], "delta_rule": facts["delta_rule"], "budget_epsilon": budget, "budget_source": facts["budget_source"],
        "calibration": calibration, "epsilon": 0.0, "budget_left": budget, "within_budget": True, "events": 0, "cohorts": {},
        "rounds": [],
    }
    if total is not None:
        eps = total["epsilon"]
        report |= {"epsilon": eps, "accountant": total["accountant"], "events": len(total["events"]),
                   "budget_left": None if eps is None or budget is None else max(0.0, float(budget) - eps),
                   "within_budget": eps is not None and (budget is None or eps <= float(budget) + 1e-9),
                   "epsilon_by_round": total["epsilon_by_round"]}
        for cohort in dict.fromkeys(e.cohort for e in events):
            c = spend([e for e in events if e.cohort == cohort])
            assert c is not None
            report["cohorts"][cohort] = {k: c[k] for k in ("epsilon", "rounds_joined", "steps", "noise_multiplier", "sample_rate",
                                                          "max_grad_norm", "eval_releases", "eval_noise_multiplier")}
        after = dict((r, e) for r, e in total["epsilon_by_round"])
        for r in sorted({e.round for e in events}):
            here = [e for e in events if e.round == r]
            report["rounds"].append({"round": r, "cohorts": list(dict.fromkeys(e.cohort for e in here)),
                                     "releases": [e.kind for e in here], "epsilon_after": after.get(r)})
    report["headline"] = _headline(report)
    return report


def _headline(r: Mapping[str, Any]) -> str:
    if not r["events"]:
        return f"Site {r['site']}: no DP release recorded in its ledger; nothing spent."
    budget = "no budget recorded" if r["budget_epsilon"] is None else f"of its budget {_num(r['budget_epsilon'])}"
    state = ("" if r["within_budget"] else
             " NO GUARANTEE (a release without noise)" if r["epsilon"] is None else " ABOVE ITS BUDGET")
    return (f"Site {r['site']}: epsilon {_eps(r['epsilon'])} spent {budget} (delta {_num(r['delta'])}), {r['events']} release(s) "
            f"in {len(r['rounds'])} round(s), cohort(s) {', '.join(r['cohorts'])}.{state}")


def site_document(r: Mapping[str, Any]) -> list:
    """The report's blocks (``fedlora.privacy.report``'s document model)."""
    doc: list = [("h1", f"Site privacy report: {r['site']}"), ("strong", r["headline"]),
                 ("p", f"From the site's own ledger in {r['state_dir']}; epsilon recomputed from its events "
                       f"({r.get('accountant', 'rdp')} accountant). Names recorded: {', '.join(r['names']) or 'none'}."),
                 _table(["", ""], [["epsilon spent", _eps(r["epsilon"]) if r["events"] else "0 (no DP release)"],
                                   ["budget", f"{_num(r['budget_epsilon'])} ({r['budget_source']})"],
                                   ["budget left", r["budget_left"]], ["delta", f"{_num(r['delta'])} ({r['delta_rule']})"],
                                   ["noise calibration", r["calibration"] or "none recorded"]])]
    if r["cohorts"]:
        doc += [("h2", "Per cohort (each cohort's releases on their own)"),
                _table(["cohort", "epsilon", "rounds joined", "DP-SGD steps", "noise multiplier", "sample rate q", "clip norm C",
                        "eval releases"],
                       [[c, _eps(v["epsilon"]), v["rounds_joined"], v["steps"], v["noise_multiplier"], v["sample_rate"],
                         v["max_grad_norm"], v["eval_releases"]] for c, v in r["cohorts"].items()])]
    if r["rounds"]:
        doc += [("h2", "Per round (epsilon spent so far, over every release)"),
                _table(["round", "cohorts", "releases", "epsilon after the round", "budget"],
                       [[x["round"], x["cohorts"], x["releases"], _eps(x["epsilon_after"]), r["budget_epsilon"]] for x in r["rounds"]])]
    return doc


def write_site_report(state_dir: str | Path, out: str | Path | None = None, *, budget_epsilon: float | None = None,
                      delta: float | None = None) -> tuple[dict[str, Any], list[Path]]:
    """Build the site's report and write ``site-privacy.json`` and ``site-privacy.md`` into
    ``out`` (default: the state folder), atomically. Returns the report and the paths."""
    from fedlora.files import write_text_atomic

    report = build_site_report(state_dir, budget_epsilon=budget_epsilon, delta=delta)
    target = Path(out) if out is not None else Path(state_dir)
    target.mkdir(parents=True, exist_ok=True)
    paths = [write_text_atomic(target / OUTPUTS[0], json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n"),
             write_text_atomic(target / OUTPUTS[1], markdown_blocks(site_document(report)))]
    return report, paths
