"""Client-level DP: the math (noise shares, adaptive clipping) and a federation that uses it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import run_with
from fedlora.client.adapter_cache import adapter_for
from fedlora.config import config_from_dict
from fedlora.errors import ConfigError
from fedlora.privacy.accounting import Mechanism, epsilon
from fedlora.config import PrivacyConfig
from fedlora.privacy.client_dp import (combined_noise_multiplier, effective_noise, next_clip_norm, noisy_count, noisy_fraction,
                                       noisy_mean, update_noise_multiplier)
from fedlora.privacy.clipping import clip_update, global_norm
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.records import from_record
from fedlora.server.client_dp import SAMPLED_BY_COORDINATOR, ClientLevelDp


def test_noisy_mean_is_the_plain_mean_plus_noise_of_the_configured_scale() -> None:
    rng = np.random.default_rng(0)
    shapes = {"a": (400, 250), "b": (1000,)}
    ups = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
    plain = noisy_mean(ups, shapes, 0.0, 4.0, None)
    for k in shapes:
        np.testing.assert_allclose(plain[k], sum(u[k].astype(np.float64) for u in ups) / 4.0, rtol=1e-6)
    noised = noisy_mean(ups, shapes, 2.5, 4.0, np.random.default_rng(1))
    diff = np.concatenate([(noised[k].astype(np.float64) - plain[k]).ravel() for k in shapes]) * 4.0
    assert np.std(diff) == pytest.approx(2.5, rel=0.01)


def test_effective_noise_after_dropouts_and_the_adaptive_split() -> None:
    assert effective_noise(1.2, 4, 4) == 1.2
    assert effective_noise(1.2, 4, 1) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        effective_noise(1.0, 2, 3)
    z_delta = update_noise_multiplier(1.0, 5.0)  # Andrew et al. 2021, Thm 1
    assert z_delta == pytest.approx((1.0 - 0.01) ** -0.5) and z_delta > 1.0
    assert combined_noise_multiplier(z_delta, 5.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="count noise > z / 2"):
        update_noise_multiplier(1.0, 0.5)


def test_adaptive_clipping_converges_to_the_target_quantile() -> None:
    rng = np.random.default_rng(3)
    c = 0.05
    for _ in range(400):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=50)  # median 1.0
        b = noisy_count([int(n <= c) for n in norms], 0.0, len(norms), rng)
        c = next_clip_norm(c, b, 0.5, 0.2)
    assert c == pytest.approx(1.0, rel=0.15)


def _adaptive(q: float = 0.5, n: int = 8, **over: object) -> ClientLevelDp:
    """Client-level DP with adaptive clipping for one cohort ``c`` of ``n`` sites sampled at rate ``q``."""
    cfg = PrivacyConfig(client_dp=True, adaptive_clip=True, client_clip_norm=0.5, **over)
    return ClientLevelDp(cfg, q, {"c": n})


def _updates(k: int, seed: int, shapes: dict) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{key: rng.normal(size=s).astype(np.float32) for key, s in shapes.items()} for _ in range(k)]


def test_the_count_release_is_centred_so_one_site_moves_it_by_half_over_qn() -> None:
    """Andrew et al. 2021: each bit enters as b_i - 1/2, so adding or removing one site (whatever
    its bit) moves the released fraction by exactly 1/(2 q n) at the same noise draw; a raw sum of
    bits would move it by 1/(q n) or 0, twice the sensitivity the budget split assumes."""
    qn, bits = 4.0, [1, 0, 1]
    base = noisy_count(bits, 1.3, qn, np.random.default_rng(5))
    for b in (0, 1):
        moved = noisy_count([*bits, b], 1.3, qn, np.random.default_rng(5))
        assert abs(moved - base) == pytest.approx(1 / (2 * qn), rel=1e-12)
    assert noisy_fraction(2, 3, 1.3, qn, np.random.default_rng(5)) == base  # the secure path: (sum, sites) gives the same release
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\]"):
        noisy_fraction(4, 3, 1.0, qn, None)
    # unbiased in expectation (E[m] = q n), with noise of std s_b / (q n)
    draws = np.array([noisy_count([1, 1, 0, 1], 1.3, qn, np.random.default_rng(i)) for i in range(20000)])
    assert draws.mean() == pytest.approx(0.75, abs=4 * 1.3 / qn / math.sqrt(len(draws)))
    assert draws.std() * qn == pytest.approx(1.3, rel=0.03)
    # the release of m sites whose bits are all 1 (or 0) sits m/2 above (or below) one half, over q n
    assert noisy_count([1, 1], 0.0, qn, None) == pytest.approx(0.5 + 1 / qn)
    assert noisy_count([0, 0], 0.0, qn, None) == pytest.approx(0.5 - 1 / qn)


@pytest.mark.parametrize("path", ["each update", "secure sum"])
def test_one_site_moves_the_coordinators_count_release_by_half_over_qn(path: str) -> None:
    """The same through ClientLevelDp, both release paths: the noisy fraction the coordinator
    logs (and moves C with) shifts by 1/(2 q n) when one site (bit 0 or 1) joins the round."""
    shapes = {"w": (3, 4)}
    ups = _updates(4, 0, shapes)

    def released(k: int, bits: list[int]) -> float:
        dp = _adaptive()
        if path == "each update":
            _, _, info = dp.aggregate(1, "c", shapes, ups[:k], bits, k, np.random.default_rng(9), "rdp")
        else:
            total = {"w": sum(u["w"] for u in ups[:k])}
            _, _, info = dp.release_sum(1, "c", total, k, k, sum(bits), np.random.default_rng(9), "rdp")
        return info["unclipped_fraction_noisy"]

    qn = _adaptive().expected_sites("c")
    base = released(3, [1, 0, 1])
    for b in (0, 1):
        assert abs(released(4, [1, 0, 1, b]) - base) == pytest.approx(1 / (2 * qn), rel=1e-9)
    if path == "secure sum":
        with pytest.raises(ValueError, match="3 unclipped updates among 2 sites"):
            _adaptive().release_sum(1, "c", {"w": ups[0]["w"]}, 2, 2, 3, np.random.default_rng(0), "rdp")


def _independent_epsilon(z_delta: float, count_std: float, rounds: int, delta: float, accountant: str) -> float:
    """dp_accounting's epsilon of ``rounds`` rounds, each the updates (Gaussian, sensitivity C,
    noise z_delta C) composed with the centred count (sensitivity 1/2, noise count_std, i.e.
    multiplier 2 count_std); the coordinator samples, so no amplification (rate 1)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    one_round = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_delta), dp_accounting.GaussianDpEvent(2 * count_std)])
    acc = rdp_privacy_accountant.RdpAccountant() if accountant == "rdp" else pld_privacy_accountant.PLDAccountant()
    acc.compose(one_round, rounds)  # the per-round pair, self-composed over the rounds
    return float(acc.get_epsilon(delta))


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # Opacus's PRV at sample rate 1
@pytest.mark.parametrize(("count_noise", "accountant"), [(0.0, "rdp"), (0.8, "rdp"), (3.0, "rdp"), (0.0, "prv")])
def test_the_ledger_epsilon_is_the_composition_of_both_releases(count_noise: float, accountant: str) -> None:
    """Five rounds of adaptive clipping at z = 1 (site rate q = 0.5 of 8 sites, chosen by the
    coordinator): the epsilon the ledger computes from the recorded events matches dp_accounting
    composing, per round, the updates at z_delta = (1 - (2 s_b)^-2)^(-1/2) and the centred count at
    s_b, within 1 %. The old raw-bit count (sensitivity 1) would be 17.5, not 12.3, at s_b = 1."""
    dp = _adaptive(adaptive_count_noise=count_noise)
    s_b = count_noise or 1.0  # automatic: max(q n / 20, z) = max(0.2, 1)
    assert dp.count_noise("c") == s_b
    z_delta = (1.0 - (2 * s_b) ** -2) ** -0.5  # Andrew et al. 2021, Thm 1, computed here from the formula
    ledger, shapes, rng = PrivacyLedger(), {"w": (5, 5)}, np.random.default_rng(1)
    for r in range(1, 6):
        k = int(rng.integers(0, 5))
        ups = _updates(k, r, shapes)
        _, event, _ = dp.aggregate(r, "c", shapes, ups, [int(global_norm(u) <= dp.clip_norms["c"]) for u in ups], k, rng, accountant)
        assert event.sample_rate == 1.0 and event.sampling == SAMPLED_BY_COORDINATOR and event.adjacency == "zero-out"
        ledger.record(event)
    assert dp.update_multiplier("c") == pytest.approx(z_delta, rel=1e-12)
    assert len({e.clip_norm for e in ledger.cohort_events("c")}) > 1  # adaptive clipping moved C
    ours = ledger.client_level_spent("c", 1e-5, accountant)
    assert ours == pytest.approx(_independent_epsilon(z_delta, s_b, 5, 1e-5, "rdp" if accountant == "rdp" else "pld"), rel=0.01)
    if count_noise == 0.0 and accountant == "rdp":
        assert ours == pytest.approx(12.30, abs=0.01)
        assert _independent_epsilon(z_delta, s_b / 2, 5, 1e-5, "rdp") == pytest.approx(17.49, abs=0.01)  # raw bits


def test_site_config_sends_public_figures_and_no_noise_scale() -> None:
    """A site draws its own share N(0, (z C)^2 / m) from what it is told: z (for the updates), C, m."""
    dp = _adaptive(client_noise="sites")
    cfg = dp.site_config("c", 3)
    assert cfg == {"privacy.client_dp": True, "privacy.client_clip_norm": 0.5, "privacy.client_noise": "sites",
                   "privacy.client_noise_multiplier": pytest.approx(dp.update_multiplier("c")), "privacy.client_sites": 3}
    assert not any("std" in k for k in cfg)
    shares = [cfg["privacy.client_noise_multiplier"] * cfg["privacy.client_clip_norm"] / math.sqrt(cfg["privacy.client_sites"])] * 3
    # three full shares make the update noise z_delta C; with the count at s_b the round is z = 1
    assert combined_noise_multiplier(math.sqrt(sum(s * s for s in shares)) / 0.5, dp.count_noise("c")) == pytest.approx(1.0)


def test_config_refuses_adaptive_clipping_without_client_dp_and_a_too_small_count_noise() -> None:
    with pytest.raises(ConfigError, match="privacy.adaptive_clip"):
        config_from_dict({"privacy": {"adaptive_clip": True}})
    with pytest.raises(ConfigError, match="privacy.adaptive_count_noise"):
        config_from_dict({"privacy": {"client_dp": True, "adaptive_clip": True, "adaptive_count_noise": 0.4}})


def _train_adapters(store: list):
    """An intercept that records the global adapter each train message carries."""
    def intercept(msg, ctx, reply):
        if msg.metadata.message_type == "train" and msg.content["config"]["cohort"] == "finance":
            state, _ = from_record(adapter_for(msg.content, "train"), None)  # sent now, or before and named by digest
            store.append((int(msg.content["config"]["round"]), state))
        return reply
    return intercept


def test_coordinator_noise_clips_every_update_and_accounts_each_round(make_config, tmp_path: Path) -> None:
    c = 1e-3
    cfg = make_config(tmp_path / "run", train__rounds=3,
                      privacy={"client_dp": True, "client_clip_norm": c, "client_noise_multiplier": 1e-3})
    seen: list = []
    run = run_with(cfg, _train_adapters(seen))
    by_round = {r: s for r, s in seen}  # both finance sites get the same adapter
    step = {k: by_round[2][k] - by_round[1][k] for k in by_round[1]}
    # the released mean of 2 clipped updates over 2 expected sites, plus noise of std 1e-6 * C-scale
    assert global_norm(step) <= c * (1 + 1e-3) + 1e-6 * math.sqrt(sum(v.size for v in step.values())) * 3
    assert global_norm(step) > 0.5 * c  # real updates are far larger than C: the clip is what bounds them
    ledger = PrivacyLedger.load(run / "privacy_ledger.json")
    events = ledger.cohort_events("finance")
    assert [e.round for e in events] == [1, 2, 3] and {e.noised_by for e in events} == {"coordinator"}
    summary = json.loads((run / "summary.json").read_text())
    fin = summary["privacy"]["client_level"]["cohorts"]["finance"]
    assert fin["epsilon"] == pytest.approx(epsilon([Mechanism(1e-3, 1.0, 3)], fin["delta"]))
    assert fin["delta"] == 1e-5 and fin["sample_rate"] == 1.0
    assert {e.sampling for e in events} == {"none: every site, every round"}


def test_a_federation_sampled_by_the_coordinator_is_accounted_without_amplification(make_config, tmp_path: Path) -> None:
    """Real handlers, sites picked at rate 0.5 by the coordinator, adaptive clipping: every
    event says rate 1 and zero-out, the summary says why, and the cohort's epsilon is
    dp_accounting's composition of both releases per round (not the amplified figure)."""
    cfg = make_config(tmp_path / "run", train__rounds=3, federation={"site_sample_rate": 0.5},
                      privacy={"client_dp": True, "adaptive_clip": True, "client_clip_norm": 0.05})
    run = run_with(cfg, lambda msg, ctx, reply: reply)
    events = PrivacyLedger.load(run / "privacy_ledger.json").cohort_events("finance")
    assert [e.round for e in events] == [1, 2, 3]
    assert {(e.sample_rate, e.sampling, e.adjacency) for e in events} == {(1.0, SAMPLED_BY_COORDINATOR, "zero-out")}
    summary = json.loads((run / "summary.json").read_text())["privacy"]["client_level"]
    assert summary["sampling"].startswith(SAMPLED_BY_COORDINATOR) and "rate 0.5" in summary["sampling"]
    assert summary["adjacency"].startswith("zero-out")
    fin = summary["cohorts"]["finance"]
    s_b = 1.0  # automatic: max(q n / 20, z) with q n = 1
    z_delta = (1.0 - (2 * s_b) ** -2) ** -0.5
    assert fin["epsilon"] == pytest.approx(_independent_epsilon(z_delta, s_b, 3, fin["delta"], "rdp"), rel=0.01)
    assert fin["epsilon"] > 1.3 * epsilon([Mechanism(1.0, 0.5, 3)], fin["delta"])  # 9.0, not the 6.5 rate 0.5 would claim


def test_site_noise_shares_and_a_dropout_lower_the_recorded_noise(make_config, tmp_path: Path) -> None:
    from flwr.app import Error, Message

    def drop_finance_1_in_round_2(msg, ctx, reply):
        if (msg.metadata.message_type == "train" and ctx.node_config["partition-id"] == 0
                and int(msg.content["config"]["round"]) == 2):
            return Message(Error(code=1, reason="lost connection"), reply_to=msg)
        return reply

    # noise shares only under secure aggregation (in the clear a site refuses to send an update with 1/m of the noise)
    cfg = make_config(tmp_path / "run", train__rounds=2, privacy={"client_dp": True, "client_noise": "sites"},
                      cohorts={"finance": {"sites": 3}, "medical": {"sites": 3}})
    run = run_with(cfg, drop_finance_1_in_round_2)
    events = PrivacyLedger.load(run / "privacy_ledger.json").cohort_events("finance")
    assert [e.noise_multiplier for e in events] == [1.0, pytest.approx(math.sqrt(2 / 3))]
    assert {e.noised_by for e in events} == {"sites"}
    medical = PrivacyLedger.load(run / "privacy_ledger.json").cohort_events("medical")
    assert [e.noise_multiplier for e in medical] == [1.0, 1.0]


def _site_and_plan():
    from fedlora.client.site import SiteSpec
    from fedlora.protocol import RoundPlan

    plan = RoundPlan.read({"round": 1, "cohort": "c", "labels": ["a", "b"], "seed": 0, "wire_dtype": "float32", "train.local_steps": 1,
                           "train.local_epochs": 0.0, "train.batch_size": 8, "train.optimizer": "adamw", "train.learning_rate": 0.01,
                           "train.weight_decay": 0.0, "train.max_grad_norm": 1.0, "train.eval_fraction": 0.2, "train.rounds": 1}, "test")
    return SiteSpec(name="s", cohort="c", data_path=""), plan


def test_a_site_clips_its_own_update_before_it_leaves() -> None:
    from fedlora.client.privacy_site import client_level_update
    from fedlora.protocol import ClientDpAsk

    site, plan = _site_and_plan()
    ask = ClientDpAsk.read(_adaptive().site_config("c", 2), "train")  # what the coordinator sends, read as the site reads it
    rng = np.random.default_rng(0)
    update = {"w": rng.normal(size=(50, 40)).astype(np.float32)}
    out, unclipped = client_level_update(update, ask, site=site, plan=plan)
    assert unclipped == 0 and global_norm(out) == pytest.approx(0.5, rel=1e-6)
    small = clip_update(update, 0.1)[0]
    out, unclipped = client_level_update(small, ask, site=site, plan=plan)
    assert unclipped == 1 and np.array_equal(out["w"], small["w"])


def test_a_site_draws_its_share_from_the_public_figures_it_is_sent() -> None:
    """site_config -> the site's own share: std z_delta C / sqrt(m), m = the sites sampled."""
    from fedlora.client.privacy_site import client_level_update
    from fedlora.protocol import ClientDpAsk

    site, plan = _site_and_plan()
    dp = _adaptive(client_noise="sites")
    ask = ClientDpAsk.read(dp.site_config("c", 4), "train")
    out, unclipped = client_level_update({"w": np.zeros((400, 500), dtype=np.float32)}, ask, site=site, plan=plan)
    assert unclipped == 1
    assert float(np.std(out["w"])) == pytest.approx(dp.update_multiplier("c") * 0.5 / math.sqrt(4), rel=0.01)
