"""Empirical privacy auditing: epsilon lower bounds from membership guesses (pure numpy/scipy).

Two audits, both "if the mechanism were (epsilon, delta)-DP, what we saw would be unlikely":

**One training run** (Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023, arXiv 2305.08846). ``m`` canaries are each included independently with probability
1/2 (the secret bits ``S``); after training, the auditor scores every canary, guesses "in" for the
``k_in`` highest scores and "out" for the ``k_out`` lowest (``r = k_in + k_out`` guesses, abstaining
on the rest) and counts the ``v`` correct ones. Their main theorem for approximate DP, in the form
their appendix's algorithm evaluates: if the mechanism is (epsilon, delta)-DP in each canary
(add/remove), then with ``q = e^eps / (1 + e^eps)`` and ``f(j) = P[Binomial(r, q) >= j]``,

    P[W >= v] <= f(v) + 2 m delta * max_{1 <= i <= v} (f(v - i) - f(v)) / i        (*)

(for delta = 0: W is stochastically dominated by Binomial(r, q), with equality for
epsilon-DP randomised response on each bit, the worst case). The right side is the p-value of
"the mechanism is (epsilon, delta)-DP" after ``v`` correct guesses.

The lower bound at confidence ``1 - beta``: scan epsilon upwards on a grid of step 0.01, stop at
the first grid point whose p-value reaches ``beta``; the bound is the grid point before it, so
every grid point up to the bound is rejected. This is rigorous without assuming the p-value
monotone in epsilon: an (eps*, delta)-DP mechanism is (eps_i, delta)-DP for the first grid point
``eps_i >= eps*``, so the bound exceeds eps* only if that one fixed test rejects (probability at
most ``beta``). Several guess counts may be tried, each at ``beta / J`` (Bonferroni), so taking
the best afterwards does not inflate the bound.

Limits: the bound never exceeds its value for ``v = r``, about ``logit(beta ** (1 / r))`` for
delta = 0 (5.8 for 1,000 perfect guesses at 95 %, 8.1 for 10,000), so a large epsilon needs many
canaries; and the delta term grows with ``m``: once ``2 m delta`` nears ``beta`` more canaries stop
helping (at delta = 1e-5 and beta = 0.05 / 8, about 6 for 10^4 or 2 * 10^4 perfect guesses), hence
audits at a delta well below ``beta / m`` (e.g. 1e-8: 7.5 and 8.2). Canaries of independent
training runs may be pooled into one audit: a canary changes only its own run's output, so the
joint mechanism is (epsilon, delta)-DP in each canary.

**Two worlds** (the classic audit: Jagielski et al. 2020, Nasr et al. 2021). Many trainings with
and without one canary; a threshold test with false-positive rate alpha and false-negative rate
beta on an (eps, delta)-DP mechanism obeys (Kairouz et al. 2015)

    alpha + e^eps beta >= 1 - delta   and   e^eps alpha + beta >= 1 - delta,

so ``eps >= max(log((1 - delta - beta) / alpha), log((1 - delta - alpha) / beta))``, with alpha and
beta replaced by one-sided Clopper-Pearson upper bounds (each at half the allowed error); the
threshold is chosen on one half of the trials and the bound computed on the other half.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------------
# one training run (Steinke, Nasr, Jagielski 2023)
# ---------------------------------------------------------------------------------------------

EPSILON_STEP = 0.01  # resolution of the epsilon scan
MAX_EPSILON = 30.0  # beyond ~36, e^eps / (1 + e^eps) rounds to 1 in float64
_CHUNK_CELLS = 2_000_000  # grid points x pmf terms evaluated at once


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got correct={v}, guesses={r}, canaries={m}")


def one_run_p_values(m: int, r: int, v: int, epsilons: Sequence[float] | np.ndarray, delta: float) -> np.ndarray:
    """The right side of (*) (capped at 1) for each epsilon: an upper bound on the probability
    of ``>= v`` correct guesses out of ``r`` among ``m`` canaries under (epsilon, delta)-DP.
    The binomial terms of the delta part are evaluated in log space from ``epsilon`` directly
    (``log q = -log(1 + e^-eps)``, ``log(1 - q) = -log(1 + e^eps)``), exact up to rounding."""
    from scipy.special import expit, gammaln
    from scipy.stats import binom

    _check_counts(m, r, v)
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    eps = np.asarray(epsilons, dtype=np.float64)
    if np.any(eps < 0) or np.any(~np.isfinite(eps)):
        raise ValueError("epsilon must be finite and >= 0")
    if v == 0:
        return np.ones_like(eps)
    tail = binom.sf(v - 1, r, expit(eps))  # f(v) = P[Binomial(r, q) >= v], q = e^eps / (1 + e^eps)
    if delta == 0:
        return np.minimum(tail, 1.0)
    # (f(v - i) - f(v)) / i = P[v - i <= Binomial < v] / i: running means of pmf(v-1), pmf(v-2), ...
    k = np.arange(v - 1, -1, -1, dtype=np.float64)
    log_choose = gammaln(r + 1.0) - gammaln(k + 1.0) - gammaln(r - k + 1.0)
    log_q, log_1mq = -np.logaddexp(0.0, -eps), -np.logaddexp(0.0, eps)
    worst = np.empty_like(eps)
    rows = max(1, _CHUNK_CELLS // v)
    for start in range(0, len(eps), rows):
        sl = slice(start, start + rows)
        pmf = np.exp(log_choose[None, :] + k[None, :] * log_q[sl, None] + (r - k)[None, :] * log_1mq[sl, None])
        worst[sl] = np.max(np.cumsum(pmf, axis=1) / np.arange(1, v + 1)[None, :], axis=1)
    return np.minimum(tail + 2.0 * m * delta * worst, 1.0)


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """(*) at one epsilon; see ``one_run_p_values``."""
    return float(one_run_p_values(m, r, v, [epsilon], delta)[0])


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95, *,
                                step: float = EPSILON_STEP, max_epsilon: float = MAX_EPSILON) -> float:
    """The largest grid epsilon (step ``step``) such that (epsilon', delta)-DP is rejected at
    level ``1 - confidence`` for it and for every grid point below it; 0 when even epsilon 0 is
    not rejected (module docstring: rigorous without assuming monotonicity)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    beta = 1.0 - confidence
    grid = np.round(np.arange(0.0, max_epsilon + step / 2, step), 10)
    block = 256
    for start in range(0, len(grid), block):
        p = one_run_p_values(m, r, v, grid[start: start + block], delta)
        fail = np.flatnonzero(p >= beta)
        if len(fail):
            first = start + int(fail[0])
            return float(grid[first - 1]) if first > 0 else 0.0
    return float(grid[-1])


def default_guess_counts(m: int) -> tuple[tuple[int, int], ...]:
    """Guess counts ``(k_in, k_out)`` fixed before looking at the scores: the top (and bottom)
    45 %, 20 %, 5 % and 1 % of the canaries, two-sided and top-only. 45 % rather than 50 %: the
    number actually included is Binomial(m, 1/2), so guessing half would force errors."""
    out: list[tuple[int, int]] = []
    for frac in (0.45, 0.2, 0.05, 0.01):
        k = max(1, int(frac * m))
        for pair in ((k, k), (k, 0)):
            if pair not in out and sum(pair) <= m:
                out.append(pair)
    return tuple(out)


@dataclass(frozen=True)
class OneRunAuditResult:
    epsilon_lower_bound: float  # the best over the guess counts, each at (1 - confidence) / candidates
    canaries: int  # m
    guesses: int  # r of the best guess counts
    correct: int  # v of the best guess counts
    k_in: int
    k_out: int
    candidates: int  # guess counts tried (Bonferroni)
    confidence: float
    delta: float
    max_certifiable: float  # the bound had every one of the best r guesses been right


def one_run_audit(scores: Sequence[float] | np.ndarray, included: Sequence[bool] | np.ndarray, delta: float,
                  confidence: float = 0.95, guess_counts: Sequence[tuple[int, int]] | None = None) -> OneRunAuditResult:
    """The one-run audit of ``m = len(scores)`` canaries: higher score means "more likely in";
    ``included[i]`` is canary i's secret inclusion bit (each drawn independently with
    probability 1/2 *before* training, or the theorem does not apply). Ties are broken at
    random. For each ``(k_in, k_out)`` in ``guess_counts`` (default ``default_guess_counts(m)``)
    the bound is computed at ``beta / len(guess_counts)``; the largest is returned."""
    s = np.asarray(scores, dtype=np.float64)
    b = np.asarray(included, dtype=bool)
    if s.ndim != 1 or s.shape != b.shape:
        raise ValueError(f"scores and inclusion bits must be 1-d and of one length, got {s.shape} and {b.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    m = len(s)
    if m == 0:
        raise ValueError("need at least one canary")
    counts = tuple(guess_counts) if guess_counts is not None else default_guess_counts(m)
    if not counts:
        raise ValueError("need at least one guess count")
    for k_in, k_out in counts:
        if k_in < 0 or k_out < 0 or k_in + k_out > m or k_in + k_out == 0:
            raise ValueError(f"guess counts (k_in={k_in}, k_out={k_out}) must be >= 0, not both 0, and sum to <= m={m}")
    tiebreak = np.random.default_rng().random(m)
    ranked = b[np.lexsort((tiebreak, -s))]  # inclusion bits, highest score first
    each = 1.0 - (1.0 - confidence) / len(counts)
    best_eps, best_pair, best_v = 0.0, counts[0], -1
    for k_in, k_out in counts:
        v = int(ranked[:k_in].sum()) + (int((~ranked[m - k_out:]).sum()) if k_out else 0)
        if best_v >= 0 and one_run_epsilon_lower_bound(m, k_in + k_out, v, 0.0, each) <= best_eps:
            continue  # its delta = 0 bound, an upper bound on its bound, cannot beat the best
        eps = one_run_epsilon_lower_bound(m, k_in + k_out, v, delta, each)
        if best_v < 0 or eps > best_eps:
            best_eps, best_pair, best_v = eps, (k_in, k_out), v
    r = sum(best_pair)
    return OneRunAuditResult(best_eps, m, r, best_v, best_pair[0], best_pair[1], len(counts), confidence, delta,
                             one_run_epsilon_lower_bound(m, r, r, delta, each))


# ---------------------------------------------------------------------------------------------
# two worlds (many trainings with and without one canary)
# ---------------------------------------------------------------------------------------------


def clopper_pearson_upper(k: int, n: int, confidence: float) -> float:
    """One-sided upper confidence bound for a binomial rate after ``k`` successes in ``n``."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, n > 0; got k={k}, n={n}")
    if k == n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, k + 1, n - k))


def lower_bound_from_rates(alpha: float, beta: float, delta: float) -> float:
    """The epsilon a test with error rates (alpha, beta) proves; 0 when it proves nothing."""
    best = 0.0
    for a, b in ((alpha, beta), (beta, alpha)):
        if a > 0 and 1 - delta - b > 0:
            best = max(best, math.log((1 - delta - b) / a))
        elif a == 0 and 1 - delta - b > 0:
            return math.inf
    return best


@dataclass(frozen=True)
class AuditResult:
    epsilon_lower_bound: float
    threshold: float
    false_positive_rate: float  # on the evaluation half
    false_negative_rate: float
    trials_per_world: int
    confidence: float


def epsilon_lower_bound(scores_in: Sequence[float], scores_out: Sequence[float], delta: float, confidence: float = 0.95) -> AuditResult:
    """Scores: higher means "the canary was in". The threshold is chosen on the first half of
    each world's trials (the one whose bound is largest there), and the bound is computed on
    the second half with Clopper-Pearson upper bounds on both error rates."""
    if min(len(scores_in), len(scores_out)) < 4:
        raise ValueError("need at least 4 trials per world")
    h_in, h_out = len(scores_in) // 2, len(scores_out) // 2
    pick_in, pick_out = list(scores_in[:h_in]), list(scores_out[:h_out])
    eval_in, eval_out = list(scores_in[h_in:]), list(scores_out[h_out:])

    def rates(t: float, ins: list[float], outs: list[float]) -> tuple[int, int]:
        return sum(s >= t for s in outs), sum(s < t for s in ins)  # false positives, false negatives

    each = 1 - (1 - confidence) / 2  # two bounds, each at half the error (Bonferroni)

    def bound(fp: int, fn: int, n_out: int, n_in: int) -> float:
        return lower_bound_from_rates(clopper_pearson_upper(fp, n_out, each), clopper_pearson_upper(fn, n_in, each), delta)

    candidates = sorted(set(pick_in) | set(pick_out))
    midpoints = [(a + b) / 2 for a, b in zip(candidates, candidates[1:])] or candidates
    best_t, best = midpoints[0], -1.0
    for t in midpoints:  # the threshold whose bound is best on the selection half
        est = bound(*rates(t, pick_in, pick_out), len(pick_out), len(pick_in))
        if est > best:
            best, best_t = est, t
    fp, fn = rates(best_t, eval_in, eval_out)
    return AuditResult(bound(fp, fn, len(eval_out), len(eval_in)), best_t, fp / len(eval_out), fn / len(eval_in),
                       min(len(scores_in), len(scores_out)), confidence)
