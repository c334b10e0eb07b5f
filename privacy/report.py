"""``fedlora privacy-report RUN_DIR``: a privacy report a privacy officer reads, from the run's own files.

Everything is recomputed from the privacy ledger (events + what each site declared), the run's
config and its metrics; nothing is taken from a stored epsilon. Works on a finished run and on
one in progress (it reads only files the coordinator writes atomically or appends whole lines to).

It states what Ponomareva et al., "How to DP-fy ML" (JAIR 2023, section 5.4) ask a DP training
report to state: the guarantee (epsilon, delta) with its privacy unit and adjacency in plain
words, the accounting method and the sampling assumption, steps, noise and clipping, what is
released outside the guarantee (every release of ``fedlora.privacy.releases``, each under
accounted / declared public / not released / no guarantee), and whether hyper-parameters were
tuned on private data. First a one-line ``headline``, then ``warnings`` (reproducible noise, q = 1,
tiny sites, cohorts aggregated in the clear, cohorts skipped, utility at the majority baseline, sites over budget),
each cohort's accuracy next to its majority baseline, and the provenance (fedlora version, sha256
of ``config.toml``, date).

Outputs: ``privacy.json`` (the keys below, strict JSON), ``privacy.md``, ``privacy.html`` (real
tables, the title first) and ``privacy.png`` (epsilon against round per site, budget dashed).
Per site (sample-level DP): ``epsilon`` (composing its DP-SGD and eval-noise events),
``delta``, ``delta_rule``, ``budget_epsilon``, ``noise_multiplier``, ``sample_rate``, ``steps``,
``max_grad_norm``, ``accountant``, ``rounds_joined``, ``rounds_refused``, ``epsilon_by_round``
and ``events``, so epsilon can be recomputed from the report alone. Epsilon of a mechanism
without noise is infinite: ``null`` with ``"guarantee": "none (noise multiplier 0)"``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlora.errors import FedloraError

from .events import DpSgdEvent, EvalNoiseEvent
from .ledger import PrivacyLedger
from .releases import STATUSES, release_catalogue
from .summary import client_spend, site_spend

REPORT_FORMAT = "fedlora-privacy-report/1"
TITLE = "fedlora privacy report"
TINY_SITE = 100  # records (by public size): below this a site gets a warning
BASELINE_MARGIN = 0.01  # accuracy <= majority baseline + this: "at the majority baseline"
NOT_RECORDED = "not recorded by fedlora; the operator states it"
SEED_LINE = "this run gives no guarantee against anyone who knows its seed"
ATTESTATION = ("The coordinator's ledger is built from what the sites attest: each site computes its noise, sampling and "
               "epsilon from its own policy, keeps its own ledger, and sends the round's privacy event and budget status with "
               "its release; the coordinator records the events it accepts and this report recomputes epsilon from them.")
ACCOUNTING = {"rdp": "Renyi DP of the Poisson-subsampled Gaussian (Mironov, Talwar, Zhang 2019), composed over every event, "
                     "converted to (epsilon, delta) with Balle et al. 2020 (Thm 21)",
              "prv": "privacy random variables (Gopi, Lee, Wutschitz 2021), composed over every event"}
# a site's declared policy keys that change what it releases (merged into [privacy] for its catalogue)
POLICY_RELEASE_KEYS = ("public_size", "eval_metrics", "eval_budget_fraction", "reproducible_noise")


class ReportError(FedloraError):
    """The run directory cannot be reported on (names the missing or broken file)."""

    exit_code = 2


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot be read: {e}") from None


def _metrics(run: Path) -> list[dict[str, Any]]:
    """The metrics lines so far; a last line still being written is ignored."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    texts = path.read_text(encoding="utf-8").splitlines()
    lines = []
    for i, text in enumerate(texts, 1):
        if not text.strip():
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            if i == len(texts):
                break
            raise ReportError(f"{path}: line {i} is not JSON") from None
    return lines


def _provenance(run: Path, config_bytes: bytes, summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """fedlora version, sha256 of config.toml's bytes, and the run's date (summary.json's mtime, else now)."""
    import fedlora

    if (run / "summary.json").exists():
        when, source = dt.datetime.fromtimestamp((run / "summary.json").stat().st_mtime, dt.UTC), "summary.json written"
    else:
        when, source = dt.datetime.now(dt.UTC), "report built (the run has no summary.json yet)"
    version = (summary or {}).get("fedlora_version") or fedlora.__version__
    return {"fedlora_version": str(version), "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
            "date": when.replace(microsecond=0).isoformat().replace("+00:00", "Z"), "date_source": source}


def _final_utility(cohort: str, summary: Mapping[str, Any] | None, lines: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A cohort's final accuracy, majority baseline and whether it was aggregated securely: from
    summary.json, else from the last metrics line that evaluated it."""
    s = ((summary or {}).get("cohorts") or {}).get(cohort) or {}
    out = {"accuracy": s.get("accuracy"), "majority_baseline": s.get("majority_baseline"), "secure_aggregation": s.get("secure_aggregation")}
    for line in reversed(lines):
        entry = line.get("cohorts", {}).get(cohort, {})
        if out["accuracy"] is None and entry.get("accuracy") is not None:
            out["accuracy"], out["majority_baseline"] = entry["accuracy"], entry.get("majority_baseline")
        if out["secure_aggregation"] is None and "secure_aggregation" in entry:
            out["secure_aggregation"] = bool(entry["secure_aggregation"])
    if any(e.get("secure_aggregation") is False for line in lines for c, e in line.get("cohorts", {}).items() if c == cohort):
        out["secure_aggregation"] = False  # in the clear in any round
    last = next((line["cohorts"][cohort] for line in reversed(lines) if cohort in line.get("cohorts", {})), {})
    out["eval_kept_at_sites"] = bool(last.get("eval_kept_by"))
    acc, base = out["accuracy"], out["majority_baseline"]
    out["at_majority_baseline"] = None if acc is None or base is None else bool(acc <= base + BASELINE_MARGIN)
    return out


def _skipped(summary: Mapping[str, Any] | None, lines: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Cohort -> why it was skipped for the run (fail closed: too few sites for secure
    aggregation): from summary.json (``cohorts_skipped``), else from the first metrics line (a
    run in progress), whose entry of a skipped cohort is ``{"skipped": reason}``."""
    if summary is not None and "cohorts_skipped" in summary:
        cohorts = summary.get("cohorts") or {}
        return {c: str((cohorts.get(c) or {}).get("skipped") or "skipped") for c in summary["cohorts_skipped"]}
    first = next((line for line in lines if line.get("round") == 0), None) or {}
    return {c: str(e["skipped"]) for c, e in (first.get("cohorts") or {}).items() if e.get("skipped")}


def _public_size(site: Mapping[str, Any], batch_size: int | None) -> tuple[int | None, str]:
    """A site's public size: declared (``public_size``, or in its ``policy``), else estimated
    as the expected batch / q (at most the batch where q = 1)."""
    declared = site.get("public_size") or (site.get("policy") or {}).get("public_size")
    if declared:
        return int(declared), "declared"
    q = site.get("sample_rate")
    if batch_size and q:
        return int(round(batch_size / q)), "at most, as q = 1" if q >= 1 else "estimated as batch size / q"
    return None, "unknown"


def _site_privacy(privacy: Mapping[str, Any], site: Mapping[str, Any]) -> dict[str, Any]:
    """The [privacy] table as it applies to one DP site: DP on, its declared policy keys merged in."""
    policy = {**{k: site[k] for k in POLICY_RELEASE_KEYS if k in site}, **dict(site.get("policy") or {})}
    if site.get("noise") == "reproducible":
        policy["reproducible_noise"] = True
    return {**privacy, "dp": True, **{k: policy[k] for k in POLICY_RELEASE_KEYS if k in policy}}


def _release_groups(privacy: Mapping[str, Any], secagg: Mapping[str, Any], sites: Mapping[str, Any],
                    cohorts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Sites grouped by their catalogue of releases: sites with DP events under their own
    declared policy, the others under the run's config; a site of a cohort aggregated in the
    clear with secure aggregation off; the sites of skipped cohorts in one group that released
    nothing (``"skipped": True``, no releases)."""
    groups: dict[str, dict[str, Any]] = {}
    for name, s in sites.items():
        if (cohorts.get(s.get("cohort")) or {}).get("skipped"):
            groups.setdefault("skipped", {"sites": [], "dp": False, "releases": [], "skipped": True})["sites"].append(name)
            continue
        p = _site_privacy(privacy, s) if s.get("events") else dict(privacy)
        secure = (cohorts.get(s.get("cohort")) or {}).get("secure_aggregation")
        sa = {**secagg, "enabled": False} if secure is False else secagg
        cat = [r.to_dict() for r in release_catalogue(p, sa)]
        key = json.dumps(cat, sort_keys=True)
        groups.setdefault(key, {"sites": [], "dp": bool(p.get("dp")), "releases": cat})["sites"].append(name)
    return list(groups.values())


def _headline(r: Mapping[str, Any], reproducible: bool) -> str:
    sites = r["sites"]
    dp_sites = {s: v for s, v in sites.items() if v.get("events")}
    parts: list[str] = []
    if not dp_sites:
        parts.append("no sample-level DP: nothing the sites release carries a record-level guarantee" if not r["sample_level_dp"]
                     else "DP is on but no site has recorded a DP round yet")
    else:
        within = [s for s, v in dp_sites.items() if v["epsilon"] is not None and (v.get("budget_epsilon") is None
                                                                                  or v["epsilon"] <= float(v["budget_epsilon"]) + 1e-9)]
        budgets = sorted({float(v["budget_epsilon"]) for v in dp_sites.values() if v.get("budget_epsilon") is not None})
        deltas = sorted({float(v["delta"]) for v in dp_sites.values()})
        delta = f"delta {_num(deltas[0])}" if len(deltas) == 1 else f"delta at most {_num(deltas[-1])}"
        largest = max((v["epsilon"] for v in dp_sites.values() if v["epsilon"] is not None), default=None)
        if len(within) == len(dp_sites):
            scope = (f"epsilon {_num(budgets[0])}" if len(budgets) == 1 else
                     f"their own budgets (epsilon {_num(budgets[0])} to {_num(budgets[-1])})" if budgets else "no declared budget")
            parts.append(f"all {len(dp_sites)} DP sites within {scope}, {delta} (largest spent {_num(largest)})")
        else:
            over = [f"{s} ({'no guarantee' if v['epsilon'] is None else 'epsilon ' + _num(v['epsilon']) + ' of ' + _num(v['budget_epsilon'])})"
                    for s, v in dp_sites.items() if s not in within]
            parts.append(f"{len(within)} of {len(dp_sites)} DP sites within their budgets, {delta}; NOT within: {', '.join(over)}")
        if len(dp_sites) < len(sites):
            parts.append(f"{len(sites) - len(dp_sites)} site(s) without a DP round ({', '.join(s for s in sites if s not in dp_sites)})")
    client = {c: v["client_level"] for c, v in r["cohorts"].items() if v.get("client_level")}
    if client:
        parts.append("client-level epsilon " + ", ".join(f"{c} {_eps(v['epsilon'])}" for c, v in client.items()))
    clear = [c for c, v in r["cohorts"].items() if v.get("secure_aggregation") is False]
    skipped = [c for c, v in r["cohorts"].items() if v.get("skipped")]
    if len(skipped) < len(r["cohorts"]):
        every = "every cohort that trained" if skipped else "every cohort"
        parts.append(f"{every} securely aggregated" if not clear else f"aggregated in the clear: {', '.join(clear)}")
    if skipped:
        parts.append(f"SKIPPED (too few sites for secure aggregation; nothing trained or released): {', '.join(skipped)}")
    base = [c for c, v in r["cohorts"].items() if v.get("at_majority_baseline")]
    if base and r["sample_level_dp"]:
        parts.append(f"at the majority baseline: {', '.join(base)}")
    if not r["complete"]:
        parts.append(f"run in progress or stopped ({r['rounds_completed']} of {r['rounds_planned']} rounds)")
    text = "; ".join(parts)
    text = text[0].upper() + text[1:]
    return (SEED_LINE[0].upper() + SEED_LINE[1:] + " (reproducible noise). Nominally: " + text if reproducible else text) + "."


def _warnings(r: Mapping[str, Any], reproducible: bool) -> list[str]:
    """What a privacy officer must not miss, one line per kind (naming every site or cohort it concerns)."""
    out: list[str] = []
    if reproducible:
        out.append(f"{SEED_LINE[0].upper() + SEED_LINE[1:]}: privacy.reproducible_noise = true derives every noise draw and "
                   "batch from the run's seed, which the coordinator knows (a research switch, simulation only).")
    dp_sites = {s: v for s, v in r["sites"].items() if v.get("events")}
    if not r["sample_level_dp"] and not dp_sites:
        out.append("Sample-level DP is off: every update, loss and metric is released with no guarantee.")
    no_noise = [s for s, v in dp_sites.items() if v["epsilon"] is None]
    if no_noise:
        out.append(f"No guarantee at {', '.join(no_noise)}: a mechanism without noise (noise multiplier 0).")
    over = [f"{s} (epsilon {_num(v['epsilon'])} of {_num(v['budget_epsilon'])})" for s, v in dp_sites.items()
            if v["epsilon"] is not None and v.get("budget_epsilon") is not None and v["epsilon"] > float(v["budget_epsilon"]) + 1e-9]
    if over:
        out.append(f"Above budget: {', '.join(over)}.")
    full = [s for s, v in dp_sites.items() if v.get("sample_rate") is not None and v["sample_rate"] >= 1]
    if full:
        out.append(f"No amplification by sampling at {', '.join(full)}: sample rate q = 1 (every record in every step).")
    tiny = [f"{s} ({v['public_size_records']}, {v['public_size_source']})" for s, v in dp_sites.items()
            if v.get("public_size_records") is not None and v["public_size_records"] < TINY_SITE]
    if tiny:
        out.append(f"Tiny sites, fewer than {TINY_SITE} records by public size: {', '.join(tiny)}. DP noise dominates their "
                   "updates, and one record is a large share of their data.")
    clear = [c for c, v in r["cohorts"].items() if v.get("secure_aggregation") is False]
    if clear:
        out.append(f"Aggregated in the clear: cohort(s) {', '.join(clear)}. The coordinator sees each site's update, not only "
                   "the cohort's sum.")
    skipped = [f"{c} ({v['skipped']})" for c, v in r["cohorts"].items() if v.get("skipped")]
    if skipped:
        out.append(f"Skipped, nothing trained or released (its sites were sent no round): cohort(s) {'; '.join(skipped)}. "
                   "The run did not train every cohort it was configured for.")
    noised = any(v.get("eval_releases") for v in dp_sites.values())
    base = [f"{c} (accuracy {_num(v['accuracy'])}, majority {_num(v['majority_baseline'])})" for c, v in r["cohorts"].items()
            if v.get("at_majority_baseline")]
    if base and (r["sample_level_dp"] or dp_sites):
        out.append(f"DP utility at or below the majority baseline: {', '.join(base)}. The model does no better than always "
                   "predicting the most common class" + (" (the accuracy is a noised figure)." if noised else "."))
    central = [c for c, v in r["cohorts"].items() if (v.get("client_level") or {}).get("noised_by") == "coordinator"]
    if central:
        out.append(f"Client-level noise added by the coordinator ({', '.join(central)}): that guarantee holds for what leaves "
                   "the coordinator, not against it.")
    return out


def build_report(run: Path) -> dict[str, Any]:
    run = Path(run)
    if not (run / "config.toml").is_file():
        raise ReportError(f"{run} is not a fedlora run directory (no config.toml)")
    try:
        config_bytes = (run / "config.toml").read_bytes()
        cfg = tomllib.loads(config_bytes.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ReportError(f"{run / 'config.toml'}: cannot be read: {e}") from None
    privacy = cfg.get("privacy", {})
    secagg = cfg.get("secure_aggregation", {})
    lines = _metrics(run)
    rounds_done = max((x["round"] for x in lines), default=0)
    planned = int(cfg.get("train", {}).get("rounds", 0))
    complete = (run / "summary.json").exists()
    summary = _read_json(run / "summary.json") if complete else None
    sites_by_cohort = _read_json(run / "sites.json") if (run / "sites.json").exists() else {}
    ledger_path = run / "privacy_ledger.json"
    try:
        ledger = PrivacyLedger.load(ledger_path) if ledger_path.exists() else PrivacyLedger()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReportError(f"{ledger_path}: cannot be read: {e}") from None
    accountant = str(privacy.get("accountant", "rdp"))
    batch = cfg.get("train", {}).get("batch_size")

    refused: dict[str, list[int]] = {}
    failed: dict[str, list[int]] = {}
    for line in lines:
        for entry in line.get("cohorts", {}).values():
            for s in entry.get("sites_refused_budget", []):
                refused.setdefault(s, []).append(line["round"])
            for s in entry.get("sites_failed", []):
                failed.setdefault(s, []).append(line["round"])

    deviations: list[str] = []
    if not complete:
        deviations.append(f"run in progress or stopped: {rounds_done} of {planned} rounds completed")
    sites: dict[str, Any] = {}
    all_sites = {s: c for c, names in sites_by_cohort.items() for s in names}
    for site in sorted(set(all_sites) | {e.site for e in ledger.events if isinstance(e, (DpSgdEvent, EvalNoiseEvent))}):
        spend = site_spend(ledger, site)
        if spend is None:
            sites[site] = {"cohort": all_sites.get(site), "epsilon": 0.0, "rounds_joined": [], "rounds_refused": refused.get(site, []),
                           "note": "no DP round recorded"}
            continue
        eps, budget, rounds = spend["epsilon"], spend["budget_epsilon"], spend["rounds_joined"]
        twice = sorted({r for r in rounds if rounds.count(r) > 1})
        if twice:
            deviations.append(f"{site}: round(s) {twice} trained more than once (a restart mid-round); each release is charged")
        if refused.get(site):
            deviations.append(f"{site}: refused round(s) {refused[site]}: its budget would have been exceeded")
        if failed.get(site):
            deviations.append(f"{site}: failed or dropped out in round(s) {failed[site]}")
        sites[site] = spend | {"rounds_refused": refused.get(site, []),
                               "budget_left": None if eps is None or budget is None else max(0.0, float(budget) - eps)}
        size, how = _public_size(spend, batch)
        sites[site] |= {"public_size_records": size, "public_size_source": how}
        if eps is None:
            sites[site]["guarantee"] = "none (noise multiplier 0)"

    skipped = _skipped(summary, lines)
    for site, cohort in all_sites.items():
        if cohort in skipped and "events" not in sites.get(site, {}):
            sites[site]["note"] = "its cohort was skipped (too few sites for secure aggregation): nothing released"
    cohorts: dict[str, Any] = {}
    for cohort, names in sorted(sites_by_cohort.items()):
        eps = [sites[s]["epsilon"] for s in names if s in sites and sites[s].get("events")]
        finite = [e for e in eps if e is not None]
        cohorts[cohort] = {"sites": list(names), "dp_sites": len(eps), "max_epsilon": (None if len(finite) < len(eps) else max(finite, default=0.0)),
                           "min_epsilon": min(finite, default=0.0)} | _final_utility(cohort, summary, lines)
        if cohort in skipped:  # not aggregated at all: neither securely nor in the clear
            cohorts[cohort] |= {"skipped": skipped[cohort], "secure_aggregation": None, "released": "nothing (cohort skipped)"}
        elif cohorts[cohort]["secure_aggregation"] is None and not bool(secagg.get("enabled", True)):
            cohorts[cohort]["secure_aggregation"] = False
        client = client_spend(ledger, cohort)
        if client is not None:
            z = float(privacy.get("client_noise_multiplier", 1.0))
            low = [f"round {e['round']}: z = {e['noise_multiplier']:.4g}" for e in client["events"] if e["noise_multiplier"] < z - 1e-9]
            if low and not privacy.get("adaptive_clip", False):
                deviations.append(f"cohort {cohort}: client-level noise below the configured z = {z:g} after dropouts "
                                  f"(the effective z: {'; '.join(low)})")
            cohorts[cohort]["client_level"] = client

    if privacy.get("client_dp") and privacy.get("client_noise") == "sites" and not secagg.get("enabled", False):
        deviations.append("client-level noise is drawn by the sites but secure aggregation is off: the coordinator sees each site's "
                          "update with only its share (1/m of the variance); the guarantee holds for what leaves the coordinator")
    reproducible = bool(privacy.get("reproducible_noise", False)) or any(v.get("noise") == "reproducible" for v in sites.values())
    catalogue = release_catalogue(privacy | ({"reproducible_noise": True} if reproducible else {}), secagg)
    groups = _release_groups(privacy | ({"reproducible_noise": True} if reproducible else {}), secagg,
                             dict(sites) or {"(every site)": {}}, cohorts)
    tuned = privacy.get("tuned_on_private_data")
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "title": TITLE, "run": str(run.resolve()), "run_name": run.resolve().name, "complete": complete,
        "rounds_completed": rounds_done, "rounds_planned": planned, "sample_level_dp": bool(privacy.get("dp", False)),
        "client_level_dp": bool(privacy.get("client_dp", False)), "accountant": accountant, "sites": sites, "cohorts": cohorts,
        "deviations": deviations, "noise": "reproducible (derived from the run's seed)" if reproducible else "secret (the OS's CSPRNG at each site)",
        "cohorts_skipped": sorted(skipped),
        "reproducible_noise": reproducible, "attestation": ATTESTATION, "provenance": _provenance(run, config_bytes, summary),
        "hyperparameter_tuning": NOT_RECORDED if tuned is None else
        (f"tuned on private data: {'yes (not covered by this guarantee)' if tuned else 'no'} (as the config states)"
         if isinstance(tuned, bool) else str(tuned)),
        "releases": [x.to_dict() for x in catalogue], "release_groups": groups,
        "releases_by_status": {st: [x.name for x in catalogue if x.status == st] for st in STATUSES},
        "released": "see releases: " + "; ".join(f"{st}: {', '.join(x.name for x in catalogue if x.status == st) or 'none'}"
                                                 for st in STATUSES),
    }
    if report["sample_level_dp"] or any(v.get("events") for v in sites.values()):
        report["sample_level"] = {
            "unit": "one record (one row of a site's data file) at one site",
            "adjacency": "add or remove one record: whether any one record is in a site's data or not changes the probability "
                         "of anything the site releases by at most a factor e^epsilon, plus delta",
            "sampling": "Poisson: each DP-SGD step includes every record independently with rate q = expected batch / public size; "
                        + ("the coins are derived from the run's seed" if reproducible else "the coins are the site's secret"),
            "noised_by": "each site, inside DP-SGD (Opacus) and on its eval metrics, before anything leaves the site",
            "accounting": ACCOUNTING.get(accountant, accountant),
            "composition": "over every round the site joined and every noised eval release, from the ledger's events "
                           "(never a running float)",
        }
    if report["client_level_dp"]:
        adjacency = sorted({e["adjacency"] for c in cohorts.values() if c.get("client_level") for e in c["client_level"]["events"]})
        report["client_level"] = {
            "unit": "one whole site (all its records)",
            "adjacency": ("zero-out: the site list is public; the guarantee bounds the change when one site's contribution is "
                          "replaced by zeros" if adjacency in ([], ["zero-out"]) else ", ".join(adjacency)),
            "sampling": (f"by the coordinator (not secret): no amplification; sites picked at rate "
                         f"{cfg.get('federation', {}).get('site_sample_rate', 1.0)} per round, accounted at sample rate 1"),
            "noised_by": "the coordinator" if privacy.get("client_noise", "coordinator") == "coordinator"
                         else "the sites, each adding a share N(0, (z C)^2 / m) for the m sites sampled; only the sum carries the full noise",
            "adaptive_clip": bool(privacy.get("adaptive_clip", False)),
        }
    report["warnings"] = _warnings(report, reproducible)
    report["headline"] = _headline(report, reproducible)
    return report


# ---- rendering: one document, two writers -------------------------------------------
def _num(x: Any) -> str:
    """A number for people: 4 significant digits, small ones as 1e-5 (not 1e-05)."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x != 0 and abs(x) < 1e-3:
            mant, exp = f"{x:.1e}".split("e")  # 0.000915 -> 9.2e-4 (".2g" writes 0.00092: no exponent)
            return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
        return f"{x:.4g}"
    return str(x)


def _eps(x: Any) -> str:
    """An epsilon: None means infinite (no noise)."""
    return "inf (no guarantee)" if x is None else _num(x)


def _fmt(x: Any) -> str:
    """A table cell: lists as "1, 2" (empty: "none"), dicts as "key = value; ...", numbers via _num."""
    if isinstance(x, (list, tuple)):
        return ", ".join(_fmt(v) for v in x) if x else "none"
    if isinstance(x, Mapping):
        return "; ".join(f"{k} = {_fmt(v)}" for k, v in x.items()) if x else "none"
    return _num(x)


Block = tuple[str, Any]  # ("h1"|"h2"|"p"|"strong"|"ul"|"table"|"img", payload)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Block:
    return ("table", ([str(h) for h in header], [[_fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]))


def _document(r: Mapping[str, Any], plot_name: str | None) -> list[Block]:
    title = f"Privacy report: {r.get('run_name', Path(r['run']).name)}"
    if r.get("reproducible_noise"):
        title += f" ({SEED_LINE})"
    prov = r.get("provenance", {})
    doc: list[Block] = [("h1", title), ("strong", r.get("headline", "")),
                        ("p", f"Run {r['run']}: {'complete' if r['complete'] else 'in progress or stopped'}, "
                              f"{r['rounds_completed']} of {r['rounds_planned']} rounds. fedlora {prov.get('fedlora_version', '-')}, "
                              f"config sha256 {prov.get('config_sha256', '-')[:16]}..., date {prov.get('date', '-')} "
                              f"({prov.get('date_source', '')}).")]
    doc += [("h2", "Warnings"), ("ul", list(r.get("warnings") or ["none"]))]
    sl, cl = r.get("sample_level"), r.get("client_level")
    doc.append(("h2", "The guarantee"))
    if sl:
        doc.append(_table(["", "sample-level DP (DP-SGD at each site)"],
                          [["guarantee", _guarantee_words(r)], ["privacy unit", sl["unit"]], ["adjacency", sl["adjacency"]], ["accounting", sl["accounting"]],
                           ["sampling", sl["sampling"]], ["noise added by", sl["noised_by"]], ["composition", sl["composition"]],
                           ["noise source", r.get("noise", "-")]]))
    else:
        doc.append(("p", "No sample-level DP in this run."))
    if cl:
        doc.append(_table(["", "client-level DP"], [["privacy unit", cl["unit"]], ["adjacency", cl["adjacency"]],
                                                    ["sampling", cl["sampling"]], ["noise added by", cl["noised_by"]],
                                                    ["adaptive clipping", _num(cl["adaptive_clip"])]]))
    doc += [("p", f"Hyper-parameters tuned on private data: {r.get('hyperparameter_tuning', NOT_RECORDED)}."),
            ("p", r.get("attestation", ATTESTATION))]
    dp_sites = {s: v for s, v in r["sites"].items() if v.get("events")}
    no_round = "0 (no DP round yet)" if r["sample_level_dp"] else "no DP: no guarantee"
    if r["sites"]:
        doc += [("h2", "What each site spent"),
                _table(["site", "cohort", "epsilon", "budget", "budget left", "delta", "how delta was chosen", "rounds joined", "rounds refused"],
                       [[s, v.get("cohort") or "-", _eps(v.get("epsilon")) if v.get("events") else no_round,
                         v.get("budget_epsilon"), v.get("budget_left"), v.get("delta"), v.get("delta_rule", "-"),
                         v.get("rounds_joined", []), v.get("rounds_refused", [])] for s, v in r["sites"].items()])]
    if plot_name:
        doc.append(("img", plot_name))
    if dp_sites:
        doc += [("h2", "Mechanism: steps, noise and clipping"),
                _table(["site", "noise multiplier", "sample rate q", "DP-SGD steps", "clip norm C", "eval releases", "eval noise multiplier",
                        "public size (records)", "accountant"],
                       [[s, v.get("noise_multiplier"), v.get("sample_rate"), v.get("steps"), v.get("max_grad_norm"), v.get("eval_releases", 0),
                         v.get("eval_noise_multiplier"), f"{_num(v.get('public_size_records'))} ({v.get('public_size_source', '-')})",
                         v.get("accountant")] for s, v in dp_sites.items()])]
        declared = {s: v for s, v in dp_sites.items() if any(k in v for k in ("policy", "noise", "attested_by", "eval_metrics"))}
        if declared:
            doc += [("h2", "What each site declared (its own policy)"),
                    _table(["site", "public size", "eval metrics", "noise", "attested by", "other policy"],
                           [[s, v.get("public_size", (v.get("policy") or {}).get("public_size", "not declared")),
                             v.get("eval_metrics", (v.get("policy") or {}).get("eval_metrics", "not declared")),
                             v.get("noise", "not declared"), v.get("attested_by", "not declared"),
                             {k: x for k, x in (v.get("policy") or {}).items() if k not in ("public_size", "eval_metrics")}]
                            for s, v in declared.items()])]
    doc += [("h2", "Cohorts: privacy and utility"),
            _table(["cohort", "sites", "secure aggregation", "largest epsilon", "smallest epsilon", "final accuracy", "majority baseline",
                    "client-level epsilon", "client-level delta"],
                   [[c, len(v["sites"]), "skipped (nothing released)" if v.get("skipped") else
                     "unknown" if v.get("secure_aggregation") is None else _num(v["secure_aggregation"]),
                     _eps(v["max_epsilon"]) if v.get("dp_sites") else "no DP", _eps(v["min_epsilon"]) if v.get("dp_sites") else "no DP",
                     "kept at the sites" if v.get("accuracy") is None and v.get("eval_kept_at_sites") else v.get("accuracy"),
                     "kept at the sites" if v.get("majority_baseline") is None and v.get("eval_kept_at_sites") else v.get("majority_baseline"),
                     _eps(v["client_level"]["epsilon"]) if v.get("client_level") else "-",
                     v["client_level"]["delta"] if v.get("client_level") else "-"] for c, v in r["cohorts"].items()])]
    groups = r.get("release_groups") or [{"sites": [], "releases": r.get("releases", [])}]
    doc.append(("h2", "What each site releases to the coordinator"))
    doc.append(("p", "accounted: charged to the site's ledger (the event kind named); declared public: the site's policy declares it "
                     "public (derived only from public figures); not released: kept at the site; no guarantee: released outside the "
                     "guarantee. Coordinator sees: each site's value, only the cohort's sum (secure aggregation), or nothing."))
    for g in groups:
        if g.get("skipped"):
            doc.append(("p", f"Sites {_fmt(g['sites'])}: their cohort was skipped (too few sites for secure aggregation); they "
                             "were sent no round and released nothing beyond their name and cohort."))
            continue
        if len(groups) > 1:
            doc.append(("p", f"Sites {_fmt(g['sites'])}:"))
        unsent = [x["name"] for x in g["releases"] if x["covered_by"] in ("not sent", "not asked")]
        rows = sorted((x for x in g["releases"] if x["name"] not in unsent), key=lambda x: STATUSES.index(x["status"]))  # stable
        notes = any(x["note"] for x in rows)
        doc.append(_table(["status", "release", "what", "covered by", "coordinator sees"] + (["note"] if notes else []),
                          [[x["status"], x["name"], x["what"], x["covered_by"], x["visibility"]] + ([x["note"] or "-"] if notes else [])
                           for x in rows]))
        if unsent:
            doc.append(("p", f"Not sent in this setting (not released): {_fmt(unsent)}."))
    doc += [("h2", "Deviations"), ("ul", list(r["deviations"]) or ["none"])]
    doc += [("h2", "Provenance"), _table(["", ""], [["run directory", r["run"]], ["fedlora version", prov.get("fedlora_version", "-")],
                                                      ["config.toml sha256", prov.get("config_sha256", "-")],
                                                      ["date", f"{prov.get('date', '-')} ({prov.get('date_source', '')})"],
                                                      ["report format", r["format"]]])]
    return doc


def _guarantee_words(r: Mapping[str, Any]) -> str:
    """(epsilon, delta) of the sample-level guarantee in words: each site has its own."""
    dp = [v for v in r["sites"].values() if v.get("events")]
    if not dp:
        return "no site has recorded a DP round"
    eps = [v["epsilon"] for v in dp]
    deltas = sorted({float(v["delta"]) for v in dp})
    if any(e is None for e in eps):
        span = "infinite at some site (no noise)"
    else:
        span = f"epsilon {_num(min(eps))}" if min(eps) == max(eps) else f"epsilon {_num(min(eps))} to {_num(max(eps))}"
    delta = f"delta {_num(deltas[0])}" if len(deltas) == 1 else f"delta {_num(deltas[0])} to {_num(deltas[-1])}"
    return f"each site its own (epsilon, delta)-DP: {span}, {delta} (per site below)"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(r: Mapping[str, Any]) -> str:
    """The report as Markdown: the title first, then the headline in bold."""
    return markdown_blocks(_document(r, None))


def markdown_blocks(doc: Sequence[Block]) -> str:
    """Blocks of a document (``_document``, ``fedlora.privacy.site_report``) as Markdown."""
    out: list[str] = []
    for kind, x in doc:
        if kind in ("h1", "h2"):
            out += [("# " if kind == "h1" else "## ") + x, ""]
        elif kind == "strong":
            out += [f"**{x}**", ""]
        elif kind == "p":
            out += [x, ""]
        elif kind == "ul":
            out += [f"- {item}" for item in x] + [""]
        elif kind == "table":
            header, rows = x
            out += ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows] + [""]
    return "\n".join(out)


STYLE = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:75em;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.3em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
p.headline{font-size:1.1em;font-weight:600;background:#f3f6fa;border-left:4px solid #2b6cb0;padding:.6em .8em}
p.headline.alarm{background:#fdf0ef;border-left-color:#c53030}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}td:first-child{white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.s-accounted td:first-child{color:#276749}tr.s-no-guarantee td:first-child{color:#c53030;font-weight:600}
img{max-width:100%;border:1px solid #eee}ul.warnings li{color:#9c4221}"""


def _is_num(text: str) -> bool:
    try:
        float(text.split(" ")[0])
        return True
    except ValueError:
        return False


def render_html(r: Mapping[str, Any], plot_name: str | None) -> str:
    """The report as a standalone HTML page: real tables, the title first, the plot below the spend table."""
    e = html.escape
    body: list[str] = []
    section = ""
    for kind, x in _document(r, plot_name):
        if kind in ("h1", "h2"):
            section = x
            body.append(f"<{kind}>{e(x)}</{kind}>")
        elif kind == "strong":
            alarm = " alarm" if r.get("reproducible_noise") or "NOT within" in x or "no sample-level dp" in x.lower() else ""
            body.append(f'<p class="headline{alarm}">{e(x)}</p>')
        elif kind == "p":
            body.append(f"<p>{e(x)}</p>")
        elif kind == "ul":
            cls = ' class="warnings"' if section == "Warnings" and x != ["none"] else ""
            body.append(f"<ul{cls}>" + "".join(f"<li>{e(i)}</li>" for i in x) + "</ul>")
        elif kind == "table":
            header, rows = x
            head = "" if not any(header) else "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead>"
            trs = []
            for row in rows:
                cls = f' class="s-{row[0].replace(" ", "-")}"' if header and header[0] == "status" else ""
                cells = "".join(f'<td class="num">{e(c)}</td>' if i and _is_num(c) else f"<td>{e(c)}</td>" for i, c in enumerate(row))
                trs.append(f"<tr{cls}>{cells}</tr>")
            body.append(f"<table>{head}<tbody>{''.join(trs)}</tbody></table>")
        elif kind == "img":
            body.append(f'<p><img src="{e(x)}" alt="epsilon spent against round per site, with each budget dashed"></p>')
    title = e(f"{TITLE}: {r.get('run_name', '')}")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _names(names: Sequence[str], most: int = 3) -> str:
    return ", ".join(names) if len(names) <= most else f"{', '.join(names[:most])} and {len(names) - most} more"


def plot_epsilon(r: Mapping[str, Any], path: Path) -> bool:
    """Epsilon against round per site (solid) with its budget (dashed); sites whose curves and
    budgets are identical share one line (named together); False if nothing to plot."""
    series: dict[str, tuple[list, float | None]] = {
        s: (v["epsilon_by_round"], v.get("budget_epsilon")) for s, v in r["sites"].items() if v.get("epsilon_by_round")}
    series |= {f"{c} (client-level)": (v["client_level"]["epsilon_by_round"], None) for c, v in r["cohorts"].items() if v.get("client_level")}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    merged: dict[str, list[str]] = {}
    for name, (points, budget) in sorted(series.items()):
        merged.setdefault(json.dumps([points, budget]), []).append(name)
    budgets = {b for _, b in series.values() if b is not None}
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, (key, names) in enumerate(merged.items()):
        points, budget = json.loads(key)
        pts = [p for p in points if p[1] is not None]
        start = [[0, 0.0]] if pts and pts[0][0] > 0 else []  # nothing is spent before the first release
        xs, ys = [p[0] for p in start + pts], [p[1] for p in start + pts]
        (line,) = ax.plot(xs, ys, marker="o", label=_names(names), color=f"C{i % 10}")
        if budget is not None and len(budgets) > 1:
            ax.axhline(float(budget), linestyle="--", linewidth=1, color=line.get_color())
    if len(budgets) == 1:
        ax.axhline(float(next(iter(budgets))), linestyle="--", linewidth=1, color="0.4", label=f"budget epsilon {_num(next(iter(budgets)))}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    top = max([*budgets, *(p[1] for pts, _ in series.values() for p in pts if p[1] is not None), 0.1])
    ax.set_ylim(bottom=0, top=top * 1.1)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (cumulative)")
    ax.set_title("Privacy spent per site (dashed: budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return True


def write_report(run: Path, out: Path | None = None) -> list[Path]:
    """Build the report of ``run`` and write privacy.json/.md/.html/.png into ``out``
    (default: the run directory); each file is written atomically. Returns the paths."""
    from fedlora.files import atomic_write, write_text_atomic

    report = build_report(Path(run))
    out = Path(out) if out is not None else Path(run)
    written = [write_text_atomic(out / "privacy.json", json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n"),
               write_text_atomic(out / "privacy.md", render_markdown(report))]
    plotted = []
    atomic_write(out / "privacy.png", lambda p: plotted.append(plot_epsilon(report, p)))
    if plotted and plotted[0]:
        written.append(out / "privacy.png")
    else:
        (out / "privacy.png").unlink(missing_ok=True)
    written.append(write_text_atomic(out / "privacy.html", render_html(report, "privacy.png" if len(written) == 3 else None)))
    return written
