"""Privacy math tested like math: accountant oracles, composition, calibration, clipping, noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.privacy.accounting import Mechanism, calibrate_noise, epsilon
from fedlora.privacy.clipping import add_gaussian_noise, clip_update, global_norm, noise_std
from fedlora.privacy.events import ClientDpEvent, DpSgdEvent, event_from_dict, event_to_dict
from fedlora.privacy.ledger import PrivacyLedger

OPACUS = Mechanism(noise_multiplier=1.5, sample_rate=0.04, steps=2250)  # Opacus accountants_test.py


def test_rdp_matches_opacus_published_constant() -> None:
    assert epsilon([OPACUS], 1e-5, "rdp") == pytest.approx(7.32911117143, abs=1e-9)


def test_independent_recomputation_with_dp_accounting() -> None:
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_accounting.PoissonSampledDpEvent(OPACUS.sample_rate, dp_accounting.GaussianDpEvent(OPACUS.noise_multiplier))
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event, OPACUS.steps)
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(event, OPACUS.steps)
    assert epsilon([OPACUS], 1e-5, "rdp") == pytest.approx(rdp.get_epsilon(1e-5), rel=0.01)
    assert epsilon([OPACUS], 1e-5, "prv") == pytest.approx(pld.get_epsilon(1e-5), rel=0.01)


def test_epsilon_grows_with_rounds_falls_with_noise_and_composes_across_rounds() -> None:
    per_round = [epsilon([Mechanism(1.0, 0.02, 100)] * r, 1e-5) for r in (1, 2, 4, 8)]
    assert per_round == sorted(per_round) and len(set(per_round)) == 4
    by_noise = [epsilon([Mechanism(z, 0.02, 400)], 1e-5) for z in (0.6, 0.8, 1.2, 2.0)]
    assert by_noise == sorted(by_noise, reverse=True)
    # a run split into rounds composes exactly like one long run
    assert epsilon([Mechanism(1.5, 0.04, 1000), Mechanism(1.5, 0.04, 1250)], 1e-5) == pytest.approx(epsilon([OPACUS], 1e-5), rel=1e-12)


def test_no_noise_means_no_guarantee_and_no_steps_means_nothing_spent() -> None:
    assert epsilon([Mechanism(0.0, 0.1, 10)], 1e-5) == math.inf
    assert epsilon([Mechanism(1.0, 0.1, 0)], 1e-5) == 0.0
    with pytest.raises(ValueError, match="unknown accountant 'gdp'"):
        epsilon([OPACUS], 1e-5, "gdp")


@pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")  # the deliberately extreme 'already spent' case
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_reaches_the_budget_from_below(accountant: str) -> None:
    sigma = calibrate_noise(8.0, 1e-5, 0.04, 2250, accountant=accountant)
    reached = epsilon([Mechanism(sigma, 0.04, 2250)], 1e-5, accountant)
    assert 0.99 * 8.0 <= reached <= 8.0
    prior = [Mechanism(sigma, 0.04, 1000)]
    sigma2 = calibrate_noise(8.0, 1e-5, 0.04, 1250, accountant=accountant, prior=prior)
    assert epsilon([*prior, Mechanism(sigma2, 0.04, 1250)], 1e-5, accountant) <= 8.0
    with pytest.raises(ValueError, match="already spent"):
        calibrate_noise(1.0, 1e-5, 0.04, 10, prior=[Mechanism(0.5, 0.5, 1000)])


def test_ledger_round_trips_and_enforces_a_budget(tmp_path) -> None:
    ledger = PrivacyLedger()
    for r in (1, 2, 3):
        ledger.record(DpSgdEvent(round=r, site="bank-1", cohort="finance", noise_multiplier=1.5, sample_rate=0.04, steps=750,
                                 max_grad_norm=1.0))
    ledger.record(ClientDpEvent(round=1, cohort="finance", noise_multiplier=1.0, sample_rate=1.0, clip_norm=0.5))
    assert ledger.spent("bank-1", 1e-5) == pytest.approx(7.32911117143, abs=1e-9)
    assert ledger.spent("bank-2", 1e-5) == 0.0
    ledger.save(tmp_path / "ledger.json")
    again = PrivacyLedger.load(tmp_path / "ledger.json")
    assert again.events == ledger.events
    nxt = DpSgdEvent(round=4, site="bank-1", cohort="finance", noise_multiplier=1.5, sample_rate=0.04, steps=750, max_grad_norm=1.0)
    exceed, after = again.would_exceed(nxt, budget_epsilon=8.0, delta=1e-5)
    assert exceed and after > 8.0
    assert not again.would_exceed(nxt, budget_epsilon=20.0, delta=1e-5)[0]
    with pytest.raises(ValueError, match="unknown privacy event kind 'magic'"):
        event_from_dict({**event_to_dict(nxt), "kind": "magic"})
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        DpSgdEvent(round=1, site="s", cohort="c", noise_multiplier=-1.0, sample_rate=0.1, steps=1, max_grad_norm=1.0)


def _update(scale: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    u = {"a": rng.normal(size=(40, 8)).astype(np.float32), "b": rng.normal(size=(17,)).astype(np.float32)}
    n = global_norm(u)
    return {k: (v / n * scale).astype(np.float32) for k, v in u.items()}


def test_clipping_bounds_the_norm_and_leaves_small_updates_bit_identical() -> None:
    rng = np.random.default_rng(0)
    c = 0.7
    big, norm = clip_update(_update(10 * c, rng), c)
    assert norm == pytest.approx(10 * c, rel=1e-6)
    assert global_norm(big) == pytest.approx(c, rel=1e-6)
    small = _update(0.5 * c, rng)
    out, _ = clip_update(small, c)
    assert all(np.array_equal(out[k], small[k]) and out[k].dtype == small[k].dtype for k in small)
    zeros, zn = clip_update({"a": np.zeros(5, np.float32)}, c)
    assert zn == 0.0 and np.all(zeros["a"] == 0)
    for bad in (np.nan, np.inf):
        u = _update(1.0, rng)
        u["b"][3] = bad
        with pytest.raises(ValueError, match="'b' holds NaN or Inf"):
            clip_update(u, c)


def test_noise_std_is_within_one_percent_of_the_configured_scale() -> None:
    z, c, d = 1.3, 0.5, 400_000
    rng = np.random.default_rng(42)
    zero = {"x": np.zeros(d, dtype=np.float32)}
    central = add_gaussian_noise(zero, noise_std(z, c), rng)["x"]
    assert np.std(central, dtype=np.float64) == pytest.approx(z * c, rel=0.01)
    # distributed: 8 sites each add a share; the sum carries the full scale
    shares = [add_gaussian_noise(zero, noise_std(z, c, shares=8), rng)["x"].astype(np.float64) for _ in range(8)]
    assert np.std(np.sum(shares, axis=0)) == pytest.approx(z * c, rel=0.01)
    assert np.std(shares[0]) == pytest.approx(z * c / math.sqrt(8), rel=0.01)
