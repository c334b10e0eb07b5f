"""Empirical privacy auditing: an epsilon lower bound from a membership test's errors.

If a mechanism is (epsilon, delta)-DP, every test that tries to tell "the canary was in the
training data" from "it was not" has false-positive rate alpha and false-negative rate beta
with (Kairouz et al. 2015; used for auditing by Jagielski et al. 2020, Nasr et al. 2021)

    alpha + e^eps beta >= 1 - delta   and   e^eps alpha + beta >= 1 - delta,

so ``eps >= max(log((1 - delta - beta) / alpha), log((1 - delta - alpha) / beta))``. With
finitely many trials, alpha and beta are replaced by one-sided Clopper-Pearson upper bounds
(each at half the allowed error), which makes the bound hold with the given confidence. The threshold of
the test is chosen on one half of the trials and the bound is computed on the other half,
so the choice does not inflate it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


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
