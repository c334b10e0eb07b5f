"""The privacy sections of a run config: DP (sample- and client-level) and secure aggregation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .validation import one_of, require


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level DP (DP-SGD) at every site, with a per-site budget (epsilon, delta).

    ``delta = 0`` means automatic: 1e-5, or 0.1 / n at a site with n <= 1e5 training records
    (delta must stay below 1/n). ``budgets`` gives single sites their own epsilon.

    Client-level DP (``client_dp``; privacy unit: one whole site) clips each site's update to
    ``client_clip_norm`` and adds ``N(0, (client_noise_multiplier * C)^2)`` to each cohort's
    sum, drawn by the coordinator or in shares by the sites (``client_noise``); see
    ``fedlora.privacy.client_dp``. ``adaptive_clip`` moves C towards the
    ``adaptive_target_quantile`` of the update norms (Andrew et al. 2021).

    What reaches the sites is a request: each site applies the more private of it and its own
    policy (``fedlora.privacy.policy``). In simulation the virtual sites' policies come from here:
    a site with an entry in ``budgets`` requires DP within it even when ``dp`` is false.
    ``eval_metrics`` says what a DP site does with its eval metrics: ``site`` (kept at the site;
    in simulation the harness reads them from the sites' state folders), ``noised`` (Gaussian
    noise, ``eval_budget_fraction`` of the budget) or ``public`` (exact, outside the guarantee).
    ``reproducible_noise`` (simulation only, research) seeds the DP noise from the run's seed:
    the run then gives no guarantee against anyone who knows the seed."""

    dp: bool = True  # a privacy-preserving platform: DP-SGD at epsilon 8 per site unless --no-dp
    epsilon: float = 8.0
    delta: float = 0.0
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0  # 0: each site calibrates sigma to its budget over the planned rounds
    accountant: str = "rdp"
    grad_sample_mode: str = "hooks"  # Opacus per-sample gradients: hooks, or ghost (ghost clipping, no per-sample grads kept)
    budgets: Mapping[str, float] = field(default_factory=dict)
    client_dp: bool = False
    client_noise_multiplier: float = 1.0
    client_clip_norm: float = 1.0
    client_delta: float = 0.0  # 0: 1e-5, or 0.1/n for a cohort of n sites where 1e-5 is not below 1/(10 n)
    client_noise: str = "coordinator"  # who draws the noise: coordinator, or sites (shares; for secure aggregation)
    adaptive_clip: bool = False
    adaptive_target_quantile: float = 0.5
    adaptive_clip_lr: float = 0.2
    adaptive_count_noise: float = 0.0  # std of the noise on the clipped count; 0: max(expected sites / 20, z)
    eval_metrics: str = "site"  # under DP: site | noised | public
    eval_budget_fraction: float = 0.1  # share of a site's budget for noised eval metrics
    reproducible_noise: bool = False  # research switch (simulation only): seeded DP noise, no guarantee against the seed

    def __post_init__(self) -> None:
        require(isinstance(self.dp, bool), "privacy.dp", self.dp, "must be true or false")
        require(isinstance(self.epsilon, (int, float)) and 0 < self.epsilon < 1000, "privacy.epsilon", self.epsilon, "must be in (0, 1000)")
        require(isinstance(self.delta, (int, float)) and 0 <= self.delta < 0.1, "privacy.delta", self.delta, "must be 0 (automatic) or in (0, 0.1)")
        require(isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0, "privacy.max_grad_norm", self.max_grad_norm, "must be > 0")
        require(isinstance(self.noise_multiplier, (int, float)) and 0 <= self.noise_multiplier <= 1e4,
                 "privacy.noise_multiplier", self.noise_multiplier, "must be 0 (calibrate to the budget) or a positive number")
        one_of("privacy.accountant", self.accountant, ("rdp", "prv"))
        one_of("privacy.grad_sample_mode", self.grad_sample_mode, ("hooks", "ghost"))
        one_of("privacy.eval_metrics", self.eval_metrics, ("site", "noised", "public"))
        require(isinstance(self.eval_budget_fraction, (int, float)) and 0 < self.eval_budget_fraction < 1,
                "privacy.eval_budget_fraction", self.eval_budget_fraction, "must be in (0, 1)")
        for key in ("client_dp", "adaptive_clip", "reproducible_noise"):
            require(isinstance(getattr(self, key), bool), f"privacy.{key}", getattr(self, key), "must be true or false")
        require(isinstance(self.client_noise_multiplier, (int, float)) and 0 < self.client_noise_multiplier <= 1e4,
                 "privacy.client_noise_multiplier", self.client_noise_multiplier, "must be in (0, 10000]")
        require(isinstance(self.client_clip_norm, (int, float)) and math.isfinite(self.client_clip_norm) and self.client_clip_norm > 0,
                 "privacy.client_clip_norm", self.client_clip_norm, "must be > 0")
        require(isinstance(self.client_delta, (int, float)) and 0 <= self.client_delta < 0.1, "privacy.client_delta", self.client_delta,
                 "must be 0 (automatic) or in (0, 0.1)")
        one_of("privacy.client_noise", self.client_noise, ("coordinator", "sites"))
        require(isinstance(self.adaptive_target_quantile, (int, float)) and 0 < self.adaptive_target_quantile < 1,
                 "privacy.adaptive_target_quantile", self.adaptive_target_quantile, "must be in (0, 1)")
        require(isinstance(self.adaptive_clip_lr, (int, float)) and 0 < self.adaptive_clip_lr <= 10,
                 "privacy.adaptive_clip_lr", self.adaptive_clip_lr, "must be in (0, 10]")
        require(isinstance(self.adaptive_count_noise, (int, float)) and self.adaptive_count_noise >= 0,
                 "privacy.adaptive_count_noise", self.adaptive_count_noise, "must be 0 (automatic) or > 0")
        if self.adaptive_count_noise > 0:
            require(2 * self.adaptive_count_noise > self.client_noise_multiplier, "privacy.adaptive_count_noise",
                     self.adaptive_count_noise, f"must exceed client_noise_multiplier / 2 = {self.client_noise_multiplier / 2:g} "
                     "(Andrew et al. 2021, Thm 1)")
        require(not self.adaptive_clip or self.client_dp, "privacy.adaptive_clip", self.adaptive_clip, "needs privacy.client_dp = true")
        require(isinstance(self.budgets, Mapping), "privacy.budgets", self.budgets, "must be a table of site = epsilon")
        for site, eps in self.budgets.items():
            require(isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1000,
                     f"privacy.budgets.{site}", eps, "must be in (0, 1000)")

    def budget_for(self, site: str) -> float:
        return float(self.budgets.get(site, self.epsilon))

    def site_requires_dp(self, site: str) -> bool:
        """Whether a virtual site's own policy requires DP: DP on for the run, or a budget of its own."""
        return self.dp or site in self.budgets


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Secure aggregation (SecAgg+; ``fedlora.privacy.secagg``): the coordinator sees only each
    cohort's sum. Each site sends ``w (update, 1, train loss / 64)`` with ``w = min(n,
    federation.weight_cap) / federation.weight_cap`` for its n training examples, quantised to ``bits`` bits in ``[-clip_range,
    clip_range]`` (``clip_range >= 1``: ``w`` and the loss term need ``[0, 1]``); the
    coordinator divides the unmasked sums and checks that honest sites can produce them. Eval
    metrics are summed exactly as integers (``metrics = "secure"``), sent per site
    (``"clear"``) or not asked for (``"none"``). A stage whose replies have not all come within
    ``stage_timeout`` seconds goes on without the late sites (dropped); below the threshold the
    round aborts.
    ``neighbours`` / ``threshold`` 0 choose automatically (see ``fedlora.server.secure_round``);
    an explicit threshold below what the sites accept (``fedlora.privacy.secagg.threshold_floor``)
    is refused before any round.

    Fail closed: a cohort with fewer than ``min_sites`` sites at discovery is skipped for the
    whole run (nothing is sent to its sites, it is named in ``metrics.jsonl``, ``summary.json``
    and the privacy report, and the CLI exits non-zero), never aggregated in the clear, unless
    ``allow_clear`` (``--allow-clear-aggregation``) says so. In simulation the virtual sites'
    policies follow: they require secure aggregation unless it is off or ``allow_clear``."""

    enabled: bool = True
    neighbours: int = 0  # k; 0: everyone up to 8 sites, else the even number >= 2 log2(n)
    threshold: int = 0  # t; 0: ceil(2 (k + 1) / 3)
    clip_range: float = 1.0
    bits: int = 20
    min_sites: int = 3  # smaller cohorts are skipped (or, with allow_clear, aggregated in the clear)
    allow_clear: bool = False  # a cohort below min_sites aggregates in the clear (loud warning) instead of being skipped
    metrics: str = "secure"  # secure | clear | none: how the sites' eval metrics reach the coordinator
    stage_timeout: float = 300.0  # seconds a protocol stage waits for the sites' replies

    def __post_init__(self) -> None:
        for key in ("enabled", "allow_clear"):
            require(isinstance(getattr(self, key), bool), f"secure_aggregation.{key}", getattr(self, key), "must be true or false")
        for key, lo, hi in (("neighbours", 0, 10_000), ("threshold", 0, 10_000), ("bits", 2, 40), ("min_sites", 2, 10_000)):
            v = getattr(self, key)
            require(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi, f"secure_aggregation.{key}", v,
                    f"must be an integer in [{lo}, {hi}]")
        for key in ("clip_range", "stage_timeout"):
            v = getattr(self, key)
            require(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"secure_aggregation.{key}", v, "must be > 0")
        require(self.clip_range >= 1, "secure_aggregation.clip_range", self.clip_range,
                "must be >= 1: each site's weight w and its loss term w * loss / 64 lie in [0, 1] and are quantised within "
                "[-clip_range, clip_range]; a smaller range clips them and biases the secure mean and train loss")
        one_of("secure_aggregation.metrics", self.metrics, ("secure", "clear", "none"))
        require(not (self.enabled and self.metrics == "clear" and not self.allow_clear), "secure_aggregation.metrics", self.metrics,
                "sends every site's eval metrics in the clear, which sites that require secure aggregation (the default) refuse: "
                "use \"secure\" or \"none\", or set secure_aggregation.allow_clear = true (--allow-clear-aggregation)")

    @property
    def sites_require_it(self) -> bool:
        """Whether the simulated sites' own policies require secure aggregation (the researcher
        owns every simulated site): on, and clear aggregation not allowed."""
        return self.enabled and not self.allow_clear
