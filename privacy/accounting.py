"""From privacy events to (epsilon, delta): composition of subsampled Gaussian mechanisms.

Each event contributes ``steps`` applications of the Poisson-subsampled Gaussian mechanism
with noise multiplier sigma and sample rate q. Accountants:

* ``rdp`` (default): Renyi DP of the sampled Gaussian (Mironov, Talwar, Zhang 2019), summed
  over all steps at orders alpha in ``RDP_ORDERS``, converted with Balle et al. 2020, Thm 21:
  ``eps = min_alpha rdp(alpha) + log((alpha-1)/alpha) - (log delta + log alpha) / (alpha - 1)``.
  The per-order values come from Opacus's analysis module (numpy/scipy, no torch code).
* ``prv``: the privacy-random-variable accountant (Gopi, Lee, Wutschitz 2021), via Opacus.

A mechanism with noise multiplier 0 gives no DP guarantee: epsilon is ``math.inf``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ACCOUNTANTS = ("rdp", "prv")
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
INTEGER_ORDERS: tuple[float, ...] = tuple(float(a) for a in RDP_ORDERS if float(a).is_integer())


@dataclass(frozen=True)
class Mechanism:
    """``steps`` applications of the Poisson-subsampled Gaussian (noise sigma, rate q)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def _check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; known: {', '.join(ACCOUNTANTS)}")


def epsilon(mechanisms: Iterable[Mechanism], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of all mechanisms (0 for none, inf without noise)."""
    _check_accountant(accountant)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    mechs = [m for m in mechanisms if m.steps > 0]
    if not mechs:
        return 0.0
    if any(m.noise_multiplier <= 0 for m in mechs):
        return math.inf
    if accountant == "rdp":
        return _rdp_epsilon(mechs, delta, RDP_ORDERS)
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in mechs]
    return float(acc.get_epsilon(delta=delta))


def _rdp_epsilon(mechs: Sequence[Mechanism], delta: float, orders: tuple[float, ...]) -> float:
    import numpy as np
    from opacus.accountants.analysis import rdp as rdp_analysis

    if any(m.noise_multiplier <= 0 for m in mechs if m.steps > 0):
        return math.inf
    total = sum(m.steps * np.asarray(_rdp_one_step(m.sample_rate, m.noise_multiplier, orders)) for m in mechs if m.steps > 0)
    if isinstance(total, int):
        return 0.0
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=total, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=8192)
def _rdp_one_step(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...] = RDP_ORDERS) -> tuple[float, ...]:
    """RDP of one sampled-Gaussian step at every order of ``RDP_ORDERS`` (Opacus's ``compute_rdp``
    is this vector times ``steps``). Cached: a site's ledger repeats the same (q, sigma) every round,
    and the fractional orders' series are slow (about a second per call on 2 loaded cores)."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    return tuple(float(v) for v in rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                                            orders=list(orders)))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, *, accountant: str = "rdp",
                    prior: Sequence[Mechanism] = (), tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (within ``tolerance`` in epsilon) such that the
    composition of ``prior`` and ``steps`` new steps at ``sample_rate`` stays <= target.
    A pure function of its arguments, cached per process (the sites of a simulation that share a
    plan and a public size calibrate once)."""
    return _calibrate(float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant, tuple(prior), float(tolerance))


@functools.lru_cache(maxsize=1024)
def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
               prior: tuple[Mechanism, ...], tolerance: float) -> float:
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    spent = epsilon(prior, delta, accountant)
    if spent >= target_epsilon:
        raise ValueError(f"the budget is already spent: epsilon {spent:.4g} >= target {target_epsilon:.4g}")

    def eps_at(sigma: float) -> float:
        with warnings.catch_warnings():  # the search probes extreme sigmas whose optimal RDP order is at the edge
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return epsilon([*prior, Mechanism(sigma, sample_rate, steps)], delta, accountant)

    lo, hi = 0.0, 1.0
    probe = eps_at
    if accountant == "rdp":  # bracket with the integer orders (50x faster; their epsilon is >= the full one's)
        def probe(sigma: float) -> float:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Optimal order is the")
                return _rdp_epsilon([*prior, Mechanism(sigma, sample_rate, steps)], delta, INTEGER_ORDERS)
    while probe(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon} in {steps} steps at rate {sample_rate}")
    if probe is not eps_at:  # hi is feasible for the full orders too; find a lower end infeasible for them
        while True:
            mid = (lo + hi) / 2
            if probe(mid) > target_epsilon:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-3 * hi:
                break
        lo = hi * 0.8
        while lo > 1e-6 and eps_at(lo) <= target_epsilon:
            hi, lo = lo, lo * 0.8
    while True:
        mid = (lo + hi) / 2
        e = eps_at(mid)
        if e > target_epsilon:
            lo = mid
        else:
            hi = mid
            if target_epsilon - e <= tolerance * target_epsilon:
                return hi
        if hi - lo < 1e-9:
            return hi


def default_delta(configured: float, n: int, unit: str = "records") -> tuple[float, str]:
    """(delta, the rule that chose it): ``configured`` if > 0; otherwise 1e-5, or 0.1/n where
    1e-5 would not be below 1/(10 n) (delta must stay well below 1/n for n privacy units)."""
    if configured > 0:
        return configured, "configured"
    if n < 1:
        raise ValueError(f"need at least one {unit} to choose delta, got n = {n}")
    if 1e-5 < 1.0 / n / 10:
        return 1e-5, "default 1e-5 (below 1/(10 n))"
    return 0.1 / n, f"0.1/n with n = {n} {unit} (1e-5 is not below 1/(10 n))"
