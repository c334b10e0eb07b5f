"""The catalogue of everything a data site releases to the coordinator, per setting (pure Python).

Threat-model rule 3 (DESIGN.md section 7): nothing computed from a site's private data leaves
it unless it is charged to the site's ledger or the site's policy declares it public. This module
lists every release of the four message types (``query``, ``train``, ``evaluate``, ``secagg``)
under exactly one status:

* ``accounted``: charged to the site's ledger, as privacy events of kind ``covered_by``
  (``dp_sgd``, ``eval_noise``, ``client_dp``); epsilon composes them all.
* ``declared public``: the site's policy declares it public (``covered_by`` names the policy
  key); it is derived only from public figures, so releasing it costs nothing.
* ``not released``: it stays at the site.
* ``no guarantee``: released outside any guarantee (DP off, the site's policy releases it
  exactly, or reproducible noise, which anyone who knows the run's seed can remove).

``visibility`` says what the coordinator gets: ``per site`` (each site's value), ``cohort sum``
(secure aggregation: only the sum over the cohort's surviving sites, which reveals no more than
each input's own status allows), or ``none``.

The rules follow the site code (``fedlora.client``): under DP (``privacy.dp``, or the site has
its own budget) q, steps, delta and the aggregation weight are derived from a *public size* (the
site's declared ``public_size``, else n rounded to 2 significant figures), never from the exact
n; train loss and train time stay at the site; eval metrics follow ``privacy.eval_metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from fedlora.privacy_config import PrivacyConfig, SecureAggregationConfig

STATUSES = ("accounted", "declared public", "not released", "no guarantee")
MESSAGES = ("query", "train", "evaluate", "secagg")
VISIBILITY = ("per site", "cohort sum", "none")
EVAL_METRICS = ("site", "noised", "public")  # from most to least private
# a key missing from a table takes the run config's own default (one source of truth)
DEFAULTS_PRIVACY = {"dp": PrivacyConfig.dp, "eval_metrics": PrivacyConfig.eval_metrics,
                    "eval_budget_fraction": PrivacyConfig.eval_budget_fraction, "reproducible_noise": PrivacyConfig.reproducible_noise,
                    "client_dp": PrivacyConfig.client_dp, "client_noise": PrivacyConfig.client_noise, "adaptive_clip": PrivacyConfig.adaptive_clip}
DEFAULTS_SECURE = {"enabled": SecureAggregationConfig.enabled, "metrics": SecureAggregationConfig.metrics}
SEED_REASON = "privacy.reproducible_noise = true: no guarantee against anyone who knows the run's seed"

#: every release id, in catalogue order, with a short label for the table "what the coordinator
#: sees, per setting"; the ids are the ones ``fedlora.protocol`` tags each wire key with
LABELS: dict[str, str] = {
    "query.identity": "site name and cohort",
    "train.update": "adapter update",
    "train.size": "training-set size",
    "train.plan": "local steps (and q)",
    "train.loss": "train loss",
    "train.seconds": "train seconds",
    "train.client_clip_bit": "adaptive-clipping bit",
    "privacy.event": "privacy events",
    "privacy.status": "budget status and policy",
    "evaluate.metrics": "eval loss, accuracy, counts",
    "evaluate.seconds": "eval seconds",
    "evaluate.kept": "\"metrics kept\" flag",
    "secagg.keys": "public keys",
    "secagg.shares": "encrypted key shares",
    "secagg.masked": "masked vector",
    "secagg.check": "survivor-set signature",
    "secagg.unmask": "unmasking shares",
}


@dataclass(frozen=True)
class Release:
    """One thing a site sends the coordinator. ``name`` is a stable id (``<message>.<item>``);
    ``what`` says it in plain words; ``status`` is one of ``STATUSES``; ``covered_by`` is the
    event kind (accounted) or the policy key (declared public) or a short reason; ``visibility``
    is one of ``VISIBILITY``; ``note`` qualifies the status (why no guarantee, which budget share)."""

    name: str  # an id of LABELS: "<message or privacy>.<item>"
    message: str
    what: str
    status: str
    covered_by: str
    visibility: str = "per site"
    note: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"release {self.name!r}: unknown status {self.status!r}; known: {', '.join(STATUSES)}")
        if self.message not in MESSAGES:
            raise ValueError(f"release {self.name!r}: unknown message {self.message!r}; known: {', '.join(MESSAGES)}")
        if self.visibility not in VISIBILITY:
            raise ValueError(f"release {self.name!r}: unknown visibility {self.visibility!r}; known: {', '.join(VISIBILITY)}")
        if (self.status == "not released") != (self.visibility == "none"):
            raise ValueError(f"release {self.name!r}: status {self.status!r} and visibility {self.visibility!r} disagree")

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "message": self.message, "what": self.what, "status": self.status,
                "covered_by": self.covered_by, "visibility": self.visibility, "note": self.note}


def dp_on(privacy: Mapping[str, Any], site: str | None = None) -> bool:
    """Sample-level DP at a site: ``privacy.dp``, or the site has its own budget (``privacy.budgets``)."""
    return bool(privacy.get("dp", DEFAULTS_PRIVACY["dp"])) or (site is not None and site in (privacy.get("budgets") or {}))


def _eval_mode(privacy: Mapping[str, Any]) -> str:
    mode = str(privacy.get("eval_metrics", DEFAULTS_PRIVACY["eval_metrics"]))
    if mode not in EVAL_METRICS:
        raise ValueError(f"privacy.eval_metrics must be one of {', '.join(EVAL_METRICS)}, got {mode!r}")
    return mode


def release_catalogue(privacy: Mapping[str, Any], secure_aggregation: Mapping[str, Any], *, site: str | None = None) -> list[Release]:
    """Every release of one site under the run config's ``[privacy]`` and ``[secure_aggregation]``
    tables (a missing key takes the run config's default, ``PrivacyConfig`` /
    ``SecureAggregationConfig``). The catalogue is total: every id of ``LABELS``, in that order,
    in every setting (what is not sent in a setting is ``not released``). ``site`` names a site
    whose own budget (``privacy.budgets``) turns DP on for it; the caller may merge a site's
    declared policy into ``privacy`` (``public_size``, ``eval_metrics``, ``reproducible_noise``)."""
    dp = dp_on(privacy, site)
    privacy = {**DEFAULTS_PRIVACY, **privacy}
    secure_aggregation = {**DEFAULTS_SECURE, **secure_aggregation}
    secure = bool(secure_aggregation["enabled"])
    sa_metrics = str(secure_aggregation["metrics"])
    client_dp = bool(privacy["client_dp"])
    adaptive = client_dp and bool(privacy["adaptive_clip"])
    sites_noise = client_dp and str(privacy["client_noise"]) == "sites"
    summed = "cohort sum" if secure else "per site"
    in_sum = " (inside the masked vector: the coordinator learns only the cohort's sum)" if secure else ""

    def kept(name: str, message: str, what: str, why: str = "kept at the site") -> Release:
        return Release(name, message, what, "not released", why, "none")

    out: list[Release] = [Release("query.identity", "query", "the site's name and cohort", "declared public", "policy.identity")]

    # ---- train
    if dp:
        size_words = ("the site's declared public size" if privacy.get("public_size") else
                      "a public size: the site's declared public_size, else n rounded to 2 significant figures")
        out += [
            Release("train.update", "train", "the adapter update (trained minus global adapter) after DP-SGD at the site" + in_sum,
                    "accounted", "dp_sgd", summed),
            Release("train.size", "train", f"{size_words} (the count it reports and its aggregation weight); never the exact "
                    "number of training records", "declared public", "policy.public_size"),
            Release("train.plan", "train", "the local steps, sample rate q and delta: derived from the public size and the public "
                    "round plan", "declared public", "policy.public_size"),
            kept("train.loss", "train", "the training loss (kept in the site's own log)"),
            kept("train.seconds", "train", "the training wall time"),
        ]
    else:
        if sites_noise and secure:  # the coordinator sees only the sum, which carries the full client-level noise
            out.append(Release("train.update", "train", "the clipped adapter update with the site's client-level noise share" + in_sum,
                               "accounted", "client_dp", summed, "client-level only: the unit is one whole site; no record-level guarantee"))
        else:
            note = ("client-level noise is drawn by the coordinator, after it has seen the update" if client_dp and not sites_noise else
                    "a noise share alone does not protect a site's update without secure aggregation" if client_dp else "")
            out.append(Release("train.update", "train", "the adapter update (trained minus global adapter), without DP-SGD" + in_sum,
                               "no guarantee", "DP off", summed, note))
        out.append(Release("train.size", "train", "the exact number of training records (its count and aggregation weight"
                           + (", inside the sum)" if secure else ")"), "no guarantee", "DP off", summed))
        if secure:
            out.append(kept("train.plan", "train", "the local steps: not sent under secure aggregation", "not sent"))
        else:
            out.append(Release("train.plan", "train", "the local steps, computed from the exact n", "no guarantee", "DP off"))
        out.append(Release("train.loss", "train", "the training loss" + in_sum, "no guarantee", "DP off", summed))
        out.append(kept("train.seconds", "train", "the training wall time: not sent under secure aggregation", "not sent") if secure else
                   Release("train.seconds", "train", "the training wall time", "no guarantee", "DP off"))
    if adaptive:
        out.append(Release("train.client_clip_bit", "train", "the bit 1[||update|| <= C] that adaptive clipping counts" + in_sum,
                           "accounted", "client_dp", summed, "counted with noise by the client-level mechanism (unit: one whole site)"))
    else:
        out.append(kept("train.client_clip_bit", "train", "the adaptive-clipping bit: not sent (adaptive clipping is off)", "not sent"))

    # ---- what the ledger records (train replies, and evaluate replies with noised metrics)
    if dp:
        out += [
            Release("privacy.event", "train", "the round's privacy events (DP-SGD: noise, q, steps, clip norm; eval noise): what the "
                    "ledger records, derived from public figures and the site's policy", "declared public", "policy.budget"),
            Release("privacy.status", "train", "the budget status (epsilon spent, budget, delta and its rule) and the policy it "
                    "declares (noise source, eval metrics mode, public size)", "declared public", "policy.budget"),
        ]
    else:
        out += [kept("privacy.event", "train", "privacy events: not sent (DP is off)", "not sent"),
                kept("privacy.status", "train", "budget status: not sent (DP is off)", "not sent")]

    # ---- evaluate
    eval_summed = "cohort sum" if secure and sa_metrics == "secure" else "per site"
    eval_in_sum = " (summed under secure aggregation: the coordinator learns only the cohort's sum)" if eval_summed == "cohort sum" else ""
    mode = _eval_mode(privacy) if dp else "public"
    if secure and sa_metrics == "none":
        out.append(kept("evaluate.metrics", "evaluate", "eval metrics: not asked for (secure_aggregation.metrics = none)", "not asked"))
    elif dp and mode == "noised":
        fraction = float(privacy["eval_budget_fraction"])
        out.append(Release("evaluate.metrics", "evaluate", "eval loss, accuracy, example and label counts on the eval split, with "
                           "Gaussian noise added at the site" + eval_in_sum, "accounted", "eval_noise", eval_summed,
                           f"uses {fraction:g} of the site's budget"))
    elif dp and mode == "site":
        out.append(kept("evaluate.metrics", "evaluate", "eval metrics stay at the site (the site logs them)", "policy.eval_metrics = site"))
    elif dp:
        out.append(Release("evaluate.metrics", "evaluate", "eval loss, accuracy, example and label counts, exact" + eval_in_sum,
                           "no guarantee", "policy.eval_metrics = public", eval_summed, "the site's policy releases them outside the guarantee"))
    else:
        out.append(Release("evaluate.metrics", "evaluate", "eval loss, accuracy, example and label counts, exact" + eval_in_sum,
                           "no guarantee", "DP off", eval_summed))
    if dp or eval_summed == "cohort sum" or (secure and sa_metrics == "none"):
        out.append(kept("evaluate.seconds", "evaluate", "the evaluation wall time"))
    else:
        out.append(Release("evaluate.seconds", "evaluate", "the evaluation wall time", "no guarantee", "DP off"))
    if dp and mode == "site" and not (secure and sa_metrics == "none"):
        out.append(Release("evaluate.kept", "evaluate", "a flag saying the site kept its metrics", "declared public", "policy.eval_metrics = site"))
    else:
        out.append(kept("evaluate.kept", "evaluate", "the \"metrics kept\" flag: not sent", "not sent"))

    # ---- secure aggregation (stages 1-4)
    if secure:
        update = next(r for r in out if r.name == "train.update")
        out += [
            Release("secagg.keys", "secagg", "two public keys per round (fresh randomness, independent of the data), signed, with the "
                    "site's certificate (its name, already known)", "declared public",
                    "policy.secure_aggregation"),
            Release("secagg.shares", "secagg", "Shamir shares of its mask seed and secret key, encrypted to each neighbour "
                    "(ciphertexts to the coordinator)", "declared public", "policy.secure_aggregation"),
            Release("secagg.masked", "secagg", f"the masked vector ({'update, weight, counts; no loss' if dp else 'update, weight, loss, counts'}):"
                    " uniformly random on its own; the "
                    "coordinator learns only the cohort's sum, which reveals no more than each input", update.status, update.covered_by,
                    "cohort sum", update.note),
            Release("secagg.check", "secagg", "its signature over the set of sites whose masked vectors the coordinator will unmask "
                    "(the consistency check: about the protocol, not the data)", "declared public", "policy.secure_aggregation"),
            Release("secagg.unmask", "secagg", "the shares it reveals to unmask the sum (survivors' mask seeds, dropped neighbours' "
                    "keys): they reveal the sum only", "declared public", "policy.secure_aggregation"),
        ]
    else:
        out += [kept(n, "secagg", f"{LABELS[n]}: not sent (secure aggregation is off)", "not sent")
                for n in ("secagg.keys", "secagg.shares", "secagg.masked", "secagg.check", "secagg.unmask")]

    if bool(privacy["reproducible_noise"]):
        out = [replace(r, status="no guarantee", note=SEED_REASON) if r.status == "accounted" else r for r in out]
    assert [r.name for r in out] == list(LABELS), "the catalogue must list every release id once, in LABELS order"
    return out


def visible_to_coordinator(privacy: Mapping[str, Any], secure_aggregation: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(message, what) of every release the coordinator receives (in any form) in this setting."""
    return [(r.message, r.what) for r in release_catalogue(privacy, secure_aggregation) if r.visibility != "none"]


SETTINGS: tuple[tuple[str, dict[str, Any], dict[str, Any]], ...] = (
    ("DP off, SecAgg off", {"dp": False}, {"enabled": False}),
    ("DP off, SecAgg on", {"dp": False}, {"enabled": True}),
    ("DP on, SecAgg off", {"dp": True}, {"enabled": False}),
    ("DP on, SecAgg on", {"dp": True}, {"enabled": True}),
)


def _cell(r: Release | None) -> str:
    if r is None or r.visibility == "none":
        return "nothing"
    status = f"accounted ({r.covered_by})" if r.status == "accounted" else r.status
    return f"{r.visibility}: {status}"


def coordinator_view_table(settings: tuple[tuple[str, dict[str, Any], dict[str, Any]], ...] = SETTINGS) -> str:
    """The markdown table "what the coordinator sees, per setting": one row per release, one
    column per setting (default: {DP off, DP on} x {secure aggregation off, on}, other keys at
    their defaults); a cell says whether the coordinator sees each site's value, only the cohort's
    sum, or nothing, and the release's status."""
    catalogues = [{r.name: r for r in release_catalogue(p, s)} for _, p, s in settings]
    lines = ["| message | release | " + " | ".join(label for label, _, _ in settings) + " |",
             "|---|---|" + "---|" * len(settings)]
    for n in LABELS:
        lines.append(f"| {catalogues[0][n].message} | {LABELS[n]} | " + " | ".join(_cell(c.get(n)) for c in catalogues) + " |")
    return "\n".join(lines) + "\n"
