"""A site's privacy policy, and how it meets what the coordinator asks (pure Python).

The policy is the site's own (``fedlora client --epsilon/--delta/--accountant/--eval-metrics/--public-size``;
in simulation ``[privacy]`` and ``[privacy.budgets]`` reach each virtual site through its node
spec). What the coordinator sends is a *request*. The rule (DESIGN.md section 7, rule 1):

    the coordinator may ask for more privacy, never less.

Knob by knob, ``effective_privacy`` takes the more private of policy and request:

* DP: on if the policy has a budget (whatever the request says) or the request asks for it;
* epsilon: ``min(policy budget, requested budget)``;
* delta: the policy's largest delta (0: automatic, 1e-5 or 0.1 / n_pub) unless the request asks
  for a smaller one. A request for a **larger** delta asks for a weaker guarantee statement and
  is refused (``PolicyRefused``, error code 4203): nothing is trained, nothing released;
* noise multiplier: the site calibrates sigma itself from its budget and the public round plan;
  a requested sigma is a floor (more noise), never taken as given;
* eval metrics: the more private of ``site`` (kept at the site) > ``noised`` (Gaussian noise
  at the site, charged) > ``public`` (released outside the guarantee);
* the accountant: the policy's, else the request's (both are valid upper bounds).
* secure aggregation (``require_secure_aggregation``, default on): the site never sends an
  update, a train loss or an eval metric in the clear. A ``train`` without a secure-aggregation
  setup is refused (``PolicyRefused``, 4203) before any data is read, anything trained or any
  budget charged; an ``evaluate`` without one too, unless nothing leaves the site (eval metrics
  ``site``). The coordinator cannot weaken it: only the site's own ``fedlora client
  --allow-clear-aggregation`` (in simulation ``secure_aggregation.allow_clear``, or secure
  aggregation off for the run) does (``refuse_clear``).

Sizes: under DP the site never reports its exact record count. Everything that depends on a size
(sampling rate, steps, automatic delta, aggregation weight, the count it reports) uses its
*public size*: the size its policy declares, else n rounded to two significant figures (which the
policy declares public, and the report lists as such).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedlora.errors import FedloraError

EVAL_MODES = ("site", "noised", "public")  # from most to least private
ACCOUNTANTS = ("rdp", "prv")


class PolicyRefused(FedloraError):
    """The coordinator asked for less privacy than the site's policy allows (error code 4203)."""

    exit_code = 8


@dataclass(frozen=True)
class SitePolicy:
    """What a site requires of every release. ``epsilon`` 0: no budget of its own (the
    coordinator's request decides whether DP runs, with the requested budget)."""

    epsilon: float = 0.0
    max_delta: float = 0.0  # 0: automatic (1e-5, or 0.1 / n_pub where 1e-5 is not below 1/(10 n_pub))
    accountant: str = ""  # "": the coordinator's choice
    eval_metrics: str = "site"
    eval_budget_fraction: float = 0.1  # share of the budget set aside for noised eval metrics
    public_size: int = 0  # 0: the training-set size rounded to 2 significant figures
    reproducible_noise: bool = False  # research only (simulation): seeded noise, no guarantee against the seed's holder
    persistent: bool = True  # the site keeps its ledger in a state folder (required for DP in deployment)
    require_secure_aggregation: bool = True  # never send an update, a loss or a metric in the clear

    def __post_init__(self) -> None:
        def bad(key: str, value: object, expected: str) -> None:
            raise FedloraError(f"site policy: {key} = {value!r}: {expected}")

        if not (isinstance(self.epsilon, (int, float)) and 0 <= self.epsilon < 1000):
            bad("epsilon", self.epsilon, "must be 0 (no own budget) or in (0, 1000)")
        if not (isinstance(self.max_delta, (int, float)) and 0 <= self.max_delta < 0.1):
            bad("max_delta", self.max_delta, "must be 0 (automatic) or in (0, 0.1)")
        if self.accountant not in ("", *ACCOUNTANTS):
            bad("accountant", self.accountant, f"must be one of {', '.join(ACCOUNTANTS)}")
        if self.eval_metrics not in EVAL_MODES:
            bad("eval_metrics", self.eval_metrics, f"must be one of {', '.join(EVAL_MODES)}")
        if not 0 < self.eval_budget_fraction < 1:
            bad("eval_budget_fraction", self.eval_budget_fraction, "must be in (0, 1)")
        if not (isinstance(self.public_size, int) and self.public_size >= 0):
            bad("public_size", self.public_size, "must be a non-negative integer")
        if not isinstance(self.require_secure_aggregation, bool):
            bad("require_secure_aggregation", self.require_secure_aggregation, "must be true or false")


@dataclass(frozen=True)
class PrivacyRequest:
    """The privacy part of the coordinator's round plan (what it asks; never trusted as such)."""

    dp: bool
    epsilon: float
    delta: float  # 0: automatic
    max_grad_norm: float
    noise_multiplier: float  # 0: the site calibrates
    accountant: str
    grad_sample_mode: str
    eval_metrics: str


@dataclass(frozen=True)
class EffectivePrivacy:
    """What the site actually applies this round."""

    dp: bool
    epsilon: float
    delta: float  # 0 until resolved against the public size (``resolve_delta``)
    max_grad_norm: float
    min_noise_multiplier: float
    accountant: str
    grad_sample_mode: str
    eval_metrics: str


CLEAR_WAY_OUT = ("to allow it, start the site with fedlora client --allow-clear-aggregation (node config "
                 "allow-clear-aggregation = true); in simulation set secure_aggregation.allow_clear = true")


def refuse_clear(policy: SitePolicy, what: str) -> None:
    """Refuse (``PolicyRefused``, code 4203) to send ``what`` in the clear when the policy
    requires secure aggregation; nothing is trained, charged or released."""
    if policy.require_secure_aggregation:
        raise PolicyRefused(f"asked to send {what} in the clear (no secure-aggregation setup), but this site's policy requires "
                            f"secure aggregation (require_secure_aggregation); nothing trained, nothing released; {CLEAR_WAY_OUT}")


def public_size(n: int, declared: int = 0) -> int:
    """The size a site reports and derives q, steps and delta from: ``declared`` if > 0, else
    n rounded to 2 significant figures (at least 1)."""
    if declared > 0:
        return int(declared)
    if n < 1:
        return 1
    digits = int(math.floor(math.log10(n))) - 1
    return max(1, int(round(n, -digits))) if digits > 0 else int(n)


def more_private_eval(a: str, b: str) -> str:
    return min(a, b, key=EVAL_MODES.index)


def effective_privacy(policy: SitePolicy, req: PrivacyRequest) -> EffectivePrivacy:
    """The more private of policy and request, knob by knob; raises ``PolicyRefused`` for a
    request that states a weaker guarantee than the policy allows (a larger delta; checked
    against the automatic delta too, once the public size is known: ``resolve_delta``)."""
    if policy.max_delta > 0 and req.delta > policy.max_delta:
        raise PolicyRefused(f"the coordinator asked for delta {req.delta:g}, above this site's largest delta {policy.max_delta:g}; "
                            "nothing trained, nothing released")
    dp = bool(req.dp) or policy.epsilon > 0
    budgets = [e for e in (policy.epsilon, float(req.epsilon) if req.dp else 0.0) if e > 0]
    eps = min(budgets) if budgets else 0.0
    if dp and eps <= 0:
        raise PolicyRefused("DP is asked for without a budget (epsilon); nothing trained")
    return EffectivePrivacy(dp=dp, epsilon=eps, delta=max(0.0, float(req.delta)), max_grad_norm=float(req.max_grad_norm),
                            min_noise_multiplier=max(0.0, float(req.noise_multiplier)),
                            accountant=policy.accountant or req.accountant, grad_sample_mode=req.grad_sample_mode,
                            eval_metrics=more_private_eval(policy.eval_metrics, req.eval_metrics) if dp else req.eval_metrics)


def resolve_delta(policy: SitePolicy, requested: float, n_public: int, default_delta) -> tuple[float, str]:
    """(delta, rule) for this site: its largest delta (the policy's, else the automatic rule on
    the public size), or the requested one if smaller. A larger request is refused."""
    if policy.max_delta > 0:
        largest, rule = float(policy.max_delta), "the site's policy"
    else:
        largest, rule = default_delta(0.0, n_public, "records (public size)")
    if requested > largest:
        raise PolicyRefused(f"the coordinator asked for delta {requested:g}, above this site's largest delta {largest:g} "
                            f"({rule}); nothing trained, nothing released")
    if 0 < requested < largest:
        return float(requested), "asked by the coordinator (below the site's largest)"
    return largest, rule
