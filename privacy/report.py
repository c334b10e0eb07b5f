"""``fedlora privacy-report RUN_DIR``: what every site spent, from the run's own files.

Everything is recomputed from the privacy ledger (events + declared assumptions), the run's
config and its metrics; nothing is taken from a stored epsilon. Works on a finished run and
on one in progress (it reads only files the coordinator writes atomically or appends whole
lines to). Outputs:

* ``privacy.json``: per site (sample-level DP): ``epsilon``, ``delta``, ``delta_rule``,
  ``budget_epsilon``, ``noise_multiplier``, ``sample_rate``, ``steps``, ``max_grad_norm``,
  ``accountant``, ``rounds_joined``, ``rounds_refused``, ``epsilon_by_round`` and the events,
  so that epsilon can be recomputed from the report alone; per cohort the range over its
  sites; client-level epsilon per cohort where used; the privacy unit, adjacency, sampling
  assumption, who adds noise, what was released, and every deviation (refusals, dropouts,
  the effective noise they caused, rounds trained twice).
* ``privacy.md``, and ``privacy.html`` with ``privacy.png`` (epsilon against round per site,
  with each site's budget as a dashed line).

Epsilon of a mechanism without noise is infinite: it appears as ``null`` with
``"guarantee": "none (noise multiplier 0)"``.
"""

from __future__ import annotations

import html
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.errors import FedloraError

from .events import DpSgdEvent
from .ledger import PrivacyLedger
from .summary import client_spend, site_spend

REPORT_FORMAT = "fedlora-privacy-report/1"


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


def build_report(run: Path) -> dict[str, Any]:
    run = Path(run)
    if not (run / "config.toml").is_file():
        raise ReportError(f"{run} is not a fedlora run directory (no config.toml)")
    try:
        cfg = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ReportError(f"{run / 'config.toml'}: cannot be read: {e}") from None
    privacy = cfg.get("privacy", {})
    lines = _metrics(run)
    rounds_done = max((x["round"] for x in lines), default=0)
    planned = int(cfg.get("train", {}).get("rounds", 0))
    complete = (run / "summary.json").exists()
    sites_by_cohort = _read_json(run / "sites.json") if (run / "sites.json").exists() else {}
    ledger_path = run / "privacy_ledger.json"
    ledger = PrivacyLedger.load(ledger_path) if ledger_path.exists() else PrivacyLedger()
    accountant = str(privacy.get("accountant", "rdp"))

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
    for site in sorted(set(all_sites) | {e.site for e in ledger.events if isinstance(e, DpSgdEvent)}):
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
        if eps is None:
            sites[site]["guarantee"] = "none (noise multiplier 0)"

    cohorts: dict[str, Any] = {}
    for cohort, names in sorted(sites_by_cohort.items()):
        eps = [sites[s]["epsilon"] for s in names if s in sites and sites[s].get("rounds_joined")]
        finite = [e for e in eps if e is not None]
        cohorts[cohort] = {"sites": list(names), "max_epsilon": (None if len(finite) < len(eps) else max(finite, default=0.0)),
                           "min_epsilon": min(finite, default=0.0)}
        client = client_spend(ledger, cohort)
        if client is not None:
            z = float(privacy.get("client_noise_multiplier", 1.0))
            low = [(e["round"], round(e["noise_multiplier"], 4)) for e in client["events"] if e["noise_multiplier"] < z - 1e-9]
            if low and not privacy.get("adaptive_clip", False):
                deviations.append(f"cohort {cohort}: client-level noise below the configured z = {z:g} after dropouts "
                                  f"(round, effective z): {low}")
            cohorts[cohort]["client_level"] = client

    if privacy.get("client_dp") and privacy.get("client_noise") == "sites" and not cfg.get("secure_aggregation", {}).get("enabled", False):
        deviations.append("client-level noise is drawn by the sites but secure aggregation is off: the coordinator sees each site's "
                          "update with only its share (1/m of the variance); the guarantee holds for what leaves the coordinator")
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "run": str(run.resolve()), "complete": complete, "rounds_completed": rounds_done,
        "rounds_planned": planned, "sample_level_dp": bool(privacy.get("dp", False)), "client_level_dp": bool(privacy.get("client_dp", False)),
        "accountant": accountant, "sites": sites, "cohorts": cohorts, "deviations": deviations,
        "released": "per round, each training site's adapter update to the coordinator (after the site's DP-SGD); "
                    "after the run, each cohort's aggregated adapter and the metrics in metrics.jsonl",
    }
    if report["sample_level_dp"]:
        report["sample_level"] = {
            "unit": "one record (one row of a site's data file) at one site",
            "adjacency": "add or remove one record (Poisson subsampling)",
            "sampling": "Poisson: each step includes every record independently with rate q = expected batch / n",
            "noised_by": "each site, inside DP-SGD (Opacus), before its update leaves the site",
            "composition": "over every round the site joined, from the ledger's events (never a running float)",
        }
    if report["client_level_dp"]:
        report["client_level"] = {
            "unit": "one whole site (all its records)",
            "adjacency": "add or remove one site of a cohort",
            "sampling": f"Poisson: each site joins a round independently with rate {cfg.get('federation', {}).get('site_sample_rate', 1.0)}",
            "noised_by": "the coordinator" if privacy.get("client_noise", "coordinator") == "coordinator"
                         else "the sites, each adding a share N(0, (z C)^2 / m) for the m sites sampled; only the sum carries the full noise",
            "adaptive_clip": bool(privacy.get("adaptive_clip", False)),
        }
    return report


# ---- rendering ---------------------------------------------------------------------
def _eps(x: Any) -> str:
    """An epsilon: None means infinite (no noise)."""
    return "inf (no guarantee)" if x is None else _fmt(x)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def render_markdown(r: Mapping[str, Any]) -> str:
    out = [f"# Privacy report: {r['run']}", "",
           f"Status: {'complete' if r['complete'] else 'in progress or stopped'}, {r['rounds_completed']} of {r['rounds_planned']} rounds. "
           f"Accountant: {r['accountant']}.", ""]
    for key, title in (("sample_level", "Sample-level DP (DP-SGD at each site)"), ("client_level", "Client-level DP")):
        if key in r:
            out += [f"## {title}", ""] + [f"- {k.replace('_', ' ')}: {v}" for k, v in r[key].items()] + [""]
    out += [f"Released: {r['released']}.", ""]
    if r["sites"]:
        out += ["## Sites", "", "| site | cohort | epsilon | budget | delta (rule) | sigma | q | steps | C | rounds joined | refused |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s, v in r["sites"].items():
            out.append(f"| {s} | {v.get('cohort')} | {_eps(v.get('epsilon'))} | {_fmt(v.get('budget_epsilon'))} | "
                       f"{_fmt(v.get('delta'))} ({v.get('delta_rule', '-')}) | {_fmt(v.get('noise_multiplier'))} | {_fmt(v.get('sample_rate'))} | "
                       f"{v.get('steps', 0)} | {_fmt(v.get('max_grad_norm'))} | {v.get('rounds_joined')} | {v.get('rounds_refused')} |")
        out.append("")
    out += ["## Cohorts", "", "| cohort | sites | max epsilon | min epsilon | client-level epsilon (delta) |", "|---|---|---|---|---|"]
    for c, v in r["cohorts"].items():
        cl = v.get("client_level")
        out.append(f"| {c} | {len(v['sites'])} | {_eps(v['max_epsilon'])} | {_eps(v['min_epsilon'])} | "
                   f"{_eps(cl['epsilon']) + ' (' + _fmt(cl['delta']) + ')' if cl else '-'} |")
    out += ["", "## Deviations", ""] + ([f"- {d}" for d in r["deviations"]] or ["- none"]) + [""]
    return "\n".join(out)


def render_html(r: Mapping[str, Any], plot_name: str | None) -> str:
    import re

    body = []
    for line in render_markdown(r).splitlines():
        if line.startswith("|---"):
            continue
        if line.startswith("| "):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    text = "\n".join(body)
    text = re.sub(r"((?:<tr>.*</tr>\n?)+)", r"<table>\n\1</table>\n", text)
    text = re.sub(r"((?:<li>.*</li>\n?)+)", r"<ul>\n\1</ul>\n", text)
    img = f'<p><img src="{html.escape(plot_name)}" alt="epsilon against round per site, with budgets"></p>' if plot_name else ""
    style = "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}td{border:1px solid #ccc;padding:2px 6px}"
    return f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>fedlora privacy report</title><style>{style}</style></head>\n<body>\n{img}\n{text}\n</body></html>\n"


def plot_epsilon(r: Mapping[str, Any], path: Path) -> bool:
    """Epsilon against round per site (solid) with its budget (dashed); False if nothing to plot."""
    series = {s: v["epsilon_by_round"] for s, v in r["sites"].items() if v.get("epsilon_by_round")}
    series |= {f"{c} (client-level)": v["client_level"]["epsilon_by_round"] for c, v in r["cohorts"].items() if v.get("client_level")}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, (name, points) in enumerate(sorted(series.items())):
        xs = [0] + [p[0] for p in points if p[1] is not None]  # nothing is spent before round 1
        ys = [0.0] + [p[1] for p in points if p[1] is not None]
        (line,) = ax.plot(xs, ys, marker="o", label=name, color=f"C{i % 10}")
        budget = r["sites"].get(name, {}).get("budget_epsilon")
        if budget is not None:
            ax.axhline(float(budget), linestyle="--", linewidth=1, color=line.get_color())
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (cumulative)")
    ax.set_title("Privacy spent per site (dashed: budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
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
    written = [write_text_atomic(out / "privacy.json", json.dumps(report, indent=2, sort_keys=True) + "\n"),
               write_text_atomic(out / "privacy.md", render_markdown(report))]
    plotted = []
    atomic_write(out / "privacy.png", lambda p: plotted.append(plot_epsilon(report, p)))
    if plotted and plotted[0]:
        written.append(out / "privacy.png")
    else:
        (out / "privacy.png").unlink(missing_ok=True)
    written.append(write_text_atomic(out / "privacy.html", render_html(report, "privacy.png" if len(written) == 3 else None)))
    return written
