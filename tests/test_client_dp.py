"""Client-level DP: the math (noise shares, adaptive clipping) and a federation that uses it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import run_with
from fedlora.config import config_from_dict
from fedlora.errors import ConfigError
from fedlora.privacy.accounting import Mechanism, epsilon
from fedlora.privacy.client_dp import (combined_noise_multiplier, effective_noise, next_clip_norm, noisy_count, noisy_mean,
                                       update_noise_multiplier)
from fedlora.privacy.clipping import clip_update, global_norm
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.records import from_record


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


def test_config_refuses_adaptive_clipping_without_client_dp_and_a_too_small_count_noise() -> None:
    with pytest.raises(ConfigError, match="privacy.adaptive_clip"):
        config_from_dict({"privacy": {"adaptive_clip": True}})
    with pytest.raises(ConfigError, match="privacy.adaptive_count_noise"):
        config_from_dict({"privacy": {"client_dp": True, "adaptive_clip": True, "adaptive_count_noise": 0.4}})


def _train_adapters(store: list):
    """An intercept that records the global adapter each train message carries."""
    def intercept(msg, ctx, reply):
        if msg.metadata.message_type == "train" and msg.content["config"]["cohort"] == "finance":
            state, _ = from_record(msg.content["adapter"], None)
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


def test_site_noise_shares_and_a_dropout_lower_the_recorded_noise(make_config, tmp_path: Path) -> None:
    from flwr.app import Error, Message

    def drop_finance_1_in_round_2(msg, ctx, reply):
        if (msg.metadata.message_type == "train" and ctx.node_config["partition-id"] == 0
                and int(msg.content["config"]["round"]) == 2):
            return Message(Error(code=1, reason="lost connection"), reply_to=msg)
        return reply

    cfg = make_config(tmp_path / "run", train__rounds=2, privacy={"client_dp": True, "client_noise": "sites"})
    run = run_with(cfg, drop_finance_1_in_round_2)
    events = PrivacyLedger.load(run / "privacy_ledger.json").cohort_events("finance")
    assert [e.noise_multiplier for e in events] == [1.0, pytest.approx(math.sqrt(0.5))]
    assert {e.noised_by for e in events} == {"sites"}
    medical = PrivacyLedger.load(run / "privacy_ledger.json").cohort_events("medical")
    assert [e.noise_multiplier for e in medical] == [1.0, 1.0]


def test_a_site_clips_its_own_update_before_it_leaves() -> None:
    from fedlora.client.privacy_site import client_level_update

    rng = np.random.default_rng(0)
    update = {"w": rng.normal(size=(50, 40)).astype(np.float32)}
    out, unclipped = client_level_update(update, {"privacy.client_clip_norm": 0.5, "privacy.client_noise": "coordinator",
                                                  "seed": 0, "round": 1}, site="s")
    assert unclipped == 0 and global_norm(out) == pytest.approx(0.5, rel=1e-6)
    small = clip_update(update, 0.1)[0]
    out, unclipped = client_level_update(small, {"privacy.client_clip_norm": 0.5, "privacy.client_noise": "coordinator",
                                                 "seed": 0, "round": 1}, site="s")
    assert unclipped == 1 and np.array_equal(out["w"], small["w"])
