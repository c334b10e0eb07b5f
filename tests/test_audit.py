"""The empirical audits: their statistics checked like math, and the one-run audit as an attack on
the real DP-SGD site path (``train_local_dp`` over several rounds, Poisson sampling, clipping)."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.client.dp_trainer import DpSgdSettings
from fedlora.model import ModelSpec, get_runtime
from fedlora.privacy.audit import (clopper_pearson_upper, default_guess_counts, epsilon_lower_bound, lower_bound_from_rates,
                                   one_run_audit, one_run_epsilon_lower_bound, one_run_p_value, one_run_p_values)
from fedlora.simulation import audit as sim_audit
from fedlora.simulation.audit import AuditSettings, run_audit

# ---- the one-run statistics (Steinke, Nasr, Jagielski 2023) --------------------------------------


def _exact_p_value(m: int, r: int, v: int, eps: Fraction, delta: Fraction) -> Fraction:
    """(*) with exact rationals (e^eps given as a Fraction): binomial sums term by term."""
    q = eps / (1 + eps)  # here ``eps`` is e^epsilon
    pmf = [Fraction(math.comb(r, j)) * q**j * (1 - q) ** (r - j) for j in range(r + 1)]
    f = lambda j: sum(pmf[max(j, 0):], Fraction(0))  # noqa: E731  P[Binomial(r, q) >= j]
    worst = max(((f(v - i) - f(v)) / i for i in range(1, v + 1)), default=Fraction(0))
    return min(Fraction(1), f(v) + 2 * m * delta * worst)


@pytest.mark.parametrize("m,r,v", [(6, 4, 3), (10, 10, 9), (12, 7, 7), (20, 15, 11), (8, 3, 0)])
@pytest.mark.parametrize("e_eps,delta", [(Fraction(3), Fraction(1, 100)), (Fraction(11, 2), Fraction(0)), (Fraction(1), Fraction(1, 1000))])
def test_p_value_equals_the_exact_binomial_sums(m: int, r: int, v: int, e_eps: Fraction, delta: Fraction) -> None:
    exact = _exact_p_value(m, r, v, e_eps, delta)
    assert one_run_p_value(m, r, v, math.log(e_eps), float(delta)) == pytest.approx(float(exact), rel=1e-9, abs=1e-15)


def _enumerated_tail(m: int, r: int, eps: float, release: float) -> list[float]:
    """P[W >= v] for v = 0..r, by enumerating every inclusion vector S and every output, for the
    mechanism that releases S itself with probability ``release`` and otherwise randomised response
    on each bit (flip with probability 1 / (1 + e^eps)): (eps, release)-DP in each bit. The auditor
    guesses its output on the first r bits and abstains on the rest."""
    keep = 1 / (1 + math.exp(-eps))
    tail = [0.0] * (r + 2)
    for s in itertools.product((0, 1), repeat=m):
        for y in itertools.product((0, 1), repeat=m):
            p_rr = math.prod(keep if a == b else 1 - keep for a, b in zip(s, y))
            p = 0.5**m * ((1 - release) * p_rr + (release if y == s else 0.0))
            w = sum(a == b for a, b in zip(s[:r], y[:r]))
            for v in range(w + 1):
                tail[v] += p
    return tail[: r + 1]


def test_randomised_response_enumerated_is_exactly_the_pure_dp_bound_and_the_delta_term_covers_a_release() -> None:
    m, r, eps = 6, 5, 1.3
    pure = _enumerated_tail(m, r, eps, 0.0)
    for v in range(r + 1):  # epsilon-DP randomised response is the worst case: (*) is tight at delta = 0
        assert one_run_p_value(m, r, v, eps, 0.0) == pytest.approx(pure[v], rel=1e-12)
    release = 0.05
    leaky = _enumerated_tail(m, r, eps, release)
    for v in range(r + 1):
        assert leaky[v] <= one_run_p_value(m, r, v, eps, release) + 1e-12  # (*) holds for this (eps, delta)-DP mechanism
    assert leaky[r] > one_run_p_value(m, r, r, eps, 0.0)  # and without its delta term it would not


def test_all_correct_guesses_give_the_closed_form_bound_which_grows_with_the_canaries() -> None:
    bounds = []
    for r in (100, 1000, 10000):
        beta = 0.05
        closed = math.log(beta ** (1 / r) / (1 - beta ** (1 / r)))  # logit(beta^(1/r)): P[Bin(r, q) = r] = q^r = beta
        got = one_run_epsilon_lower_bound(r, r, r, 0.0, 0.95)
        assert closed - 0.01 <= got <= closed + 1e-9  # the grid point just below the closed form
        bounds.append(got)
    assert bounds[0] < 3.6 < bounds[1] < 5.9 < bounds[2]  # 3.49, 5.80, 8.11
    # the delta term (2 m delta) stops the growth once it nears beta (here beta = 0.05 / 8 guess counts)
    capped = [one_run_epsilon_lower_bound(m, 9 * m // 10, 9 * m // 10, 1e-5, 1 - 0.05 / 8) for m in (10000, 20000)]
    growing = [one_run_epsilon_lower_bound(m, 9 * m // 10, 9 * m // 10, 1e-8, 1 - 0.05 / 8) for m in (10000, 20000)]
    assert capped[1] <= capped[0] < 6.1 < growing[0] < growing[1] - 0.5


def test_the_bound_is_the_last_rejected_grid_point() -> None:
    m, r, v, delta, beta = 2000, 900, 880, 1e-6, 0.05
    eps = one_run_epsilon_lower_bound(m, r, v, delta, 1 - beta)
    grid = np.round(np.arange(0, eps + 0.005, 0.01), 10)
    assert np.all(one_run_p_values(m, r, v, grid, delta) < beta)
    assert one_run_p_value(m, r, v, eps + 0.01, delta) >= beta
    assert one_run_epsilon_lower_bound(m, r, r // 2, delta, 1 - beta) == 0.0  # half right: nothing shown


def test_random_guesses_show_about_nothing_and_perfect_ones_show_the_maximum() -> None:
    rng = np.random.default_rng(1)
    bits = rng.random(4000) < 0.5
    noise = one_run_audit(rng.normal(size=4000), bits, 1e-8)
    assert noise.epsilon_lower_bound < 0.3
    perfect = one_run_audit(bits + 0.01 * rng.normal(size=4000), bits, 1e-8)
    assert perfect.correct == perfect.guesses == 2 * int(0.45 * 4000)
    assert perfect.epsilon_lower_bound == perfect.max_certifiable > 6.5
    assert perfect.candidates == len(default_guess_counts(4000)) == 8


def test_the_audit_covers_randomised_response_at_its_epsilon() -> None:
    """The worst case for the theorem: epsilon-DP randomised response. The 95 % bound may exceed
    the true epsilon in at most ~5 % of audits (here 200 audits of 1,000 canaries)."""
    rng = np.random.default_rng(7)
    eps, over, bounds = 1.0, 0, []
    for _ in range(200):
        bits = rng.random(1000) < 0.5
        flip = rng.random(1000) < 1 / (1 + math.exp(eps))
        out = np.where(flip, ~bits, bits).astype(float) + 1e-3 * rng.random(1000)  # ties broken by a little noise
        res = one_run_audit(out, bits, 0.0, guess_counts=[(500, 500)])
        over += res.epsilon_lower_bound > eps
        bounds.append(res.epsilon_lower_bound)
    assert over <= 20  # Binomial(200, 0.05) exceeds 20 with probability ~0.1 %
    assert 0.6 < float(np.median(bounds)) <= eps  # and the bound is close to the truth


def test_one_run_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="correct"):
        one_run_p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError, match="one length"):
        one_run_audit([0.1, 0.2], [True], 1e-5)
    with pytest.raises(ValueError, match="guess counts"):
        one_run_audit([0.1, 0.2], [True, False], 1e-5, guess_counts=[(2, 1)])


# ---- the two-world statistics --------------------------------------------------------------------


def test_the_bound_inverts_the_dp_inequalities() -> None:
    eps, delta = 1.5, 1e-5
    beta = 0.3
    alpha = (1 - delta - beta) / math.exp(eps)  # a test exactly on the (eps, delta) boundary
    assert lower_bound_from_rates(alpha, beta, delta) == pytest.approx(eps)
    assert lower_bound_from_rates(0.5, 0.5, delta) == 0.0  # a coin flip proves nothing
    assert clopper_pearson_upper(0, 20, 0.975) == pytest.approx(1 - 0.025 ** (1 / 20))


def test_separated_scores_give_a_positive_bound_and_identical_worlds_give_about_zero() -> None:
    rng = np.random.default_rng(0)
    far = epsilon_lower_bound(list(rng.normal(5, 1, 200)), list(rng.normal(0, 1, 200)), 1e-5)
    assert far.epsilon_lower_bound > 2.0
    same = epsilon_lower_bound(list(rng.normal(0, 1, 200)), list(rng.normal(0, 1, 200)), 1e-5)
    assert same.epsilon_lower_bound < 0.5


# ---- the audit of the real site path -------------------------------------------------------------


def test_audit_settings_refuse_what_the_audit_cannot_stand_for() -> None:
    with pytest.raises(ValueError, match="Poisson"):
        AuditSettings(sample_rate=1.0)  # q = 1 is not the subsampled mechanism the site runs
    with pytest.raises(ValueError, match="canaries"):
        AuditSettings(canaries=0)
    with pytest.raises(ValueError, match="grad_sample_mode"):
        AuditSettings(grad_sample_mode="loop")


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, far faster than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_one_run_audit_of_train_local_dp_catches_no_noise_and_a_noise_bug_and_stays_below_epsilon_with_dp(
        tiny_model: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = get_runtime(ModelSpec(str(tiny_model), 16, "sequence_classification", 4, 8.0, 0.0, ("query", "value"), "standard"), "cpu")
    s = dict(canaries=400, rounds=3, steps=4, sample_rate=0.25)  # 12 Poisson steps at q = 0.25 over 3 rounds
    off = run_audit(rt, AuditSettings(**s), progress=False)
    assert not off["dp"] and off["reported_epsilon"] is None
    assert off["mean_score_in"] > off["mean_score_out"]
    assert off["correct"] >= off["guesses"] - 2 >= 78  # (nearly) every guess right: the canaries are memorised
    assert off["epsilon_lower_bound"] > 2.5  # 80 perfect guesses certify 2.72 at 95 % (8 guess counts), 180 3.55

    on = run_audit(rt, AuditSettings(**s, epsilon=2.0), progress=False)
    assert on["dp"] and on["reported_epsilon"] <= 2.0  # recomputed from the trainer's DpSgdEvents
    assert on["epsilon_lower_bound"] <= on["reported_epsilon"]

    # a bug the audit must catch: a hundredth of the calibrated noise (a tenth certified 1.76-2.2 on the mean-pooled head:
    # the canaries' randomness is secret, so the bound varies between runs and must clear 2.0 by a margin)
    real = sim_audit.dp_settings
    monkeypatch.setattr(sim_audit, "dp_settings", lambda st: DpSgdSettings(real(st).noise_multiplier / 100, st.max_grad_norm, st.sample_rate))
    bug = run_audit(rt, AuditSettings(**s, epsilon=2.0), progress=False)
    assert bug["target_epsilon"] == 2.0 and bug["epsilon_lower_bound"] > 2.0  # the claim is refuted at 95 %
