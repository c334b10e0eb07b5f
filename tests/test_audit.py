"""The empirical audit: its statistics, and a canary attack against real local training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedlora.model import ModelSpec, get_runtime
from fedlora.privacy.audit import clopper_pearson_upper, epsilon_lower_bound, lower_bound_from_rates
from fedlora.simulation.audit import AuditSettings, run_audit


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


def test_canary_audit_detects_the_leak_without_dp_and_stays_below_the_reported_epsilon_with_it(tiny_model: Path) -> None:
    rt = get_runtime(ModelSpec(str(tiny_model), 32, "sequence_classification", 4, 8.0, 0.0, ("query", "value"), "standard"), "cpu")
    off = run_audit(rt, AuditSettings(trials=24, examples=16, steps=12, learning_rate=0.05), progress=False)
    assert off["mean_score_in"] > off["mean_score_out"] + 1.0  # the canary's own label: far likelier after training on it
    assert off["epsilon_lower_bound"] > 0.5  # a leak, proven at 95 % confidence from 12 + 12 held-out trials
    on = run_audit(rt, AuditSettings(trials=24, examples=16, steps=12, learning_rate=0.05, epsilon=1.0), progress=False)
    assert on["reported_epsilon"] <= 1.0
    assert on["epsilon_lower_bound"] <= on["reported_epsilon"]
