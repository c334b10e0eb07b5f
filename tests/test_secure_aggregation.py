"""Secure aggregation in the rounds: same result as in the clear (within the quantisation bound),
the coordinator's view holds no individual update, count or metric, dropouts at every stage
recover, a stage past its timeout aborts cleanly, small cohorts say so, and it composes with
frozen-A LoRA and client-level DP."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, Error, Message

from conftest import run_with
from fedlora.client.secagg_site import STATE_KEY
from fedlora.config import ConfigError
from fedlora.simulation.runner import simulate
from fedlora.strategies import available, get_strategy
from safetensors.numpy import load_file

SECAGG = {"enabled": True, "bits": 20, "clip_range": 1.0}
CLEAR = {"enabled": False}
FOUR = {"finance": {"sites": 4}}


def _adapters(run: Path, cohort: str) -> dict[str, np.ndarray]:
    return load_file(str(run / "adapters" / cohort / "adapter_model.safetensors"))


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _bound(sites: int, min_examples: int) -> float:
    """The weighted mean of ``sites`` updates is off by at most sites (step / 2) / sum(w),
    w = n / 1000 >= min_examples / 1000 each."""
    step = 2 * 1.0 / (2**20 - 1)
    return sites * (step / 2) / (sites * min_examples / 1000)


def test_secure_sum_matches_the_clear_sum_and_the_transcript_holds_nothing_individual(make_config, tmp_path: Path) -> None:
    plain, clear = simulate(make_config(tmp_path / "plain", cohorts=FOUR, train__rounds=1, secure_aggregation=CLEAR), progress=False)
    seen: list[tuple[str, Message]] = []  # every reply the coordinator receives
    secrets: dict[int, np.ndarray] = {}  # each site's vector before masking (read from its own state)

    def record(msg, ctx, reply):
        seen.append((msg.metadata.message_type, reply))
        if msg.metadata.message_type == "train.secagg_masked":
            rec = ctx.state[STATE_KEY]
            secrets[ctx.node_id] = np.frombuffer(rec["vector"], dtype=np.dtype(str(rec["dtype"])))
        return reply

    run = run_with(make_config(tmp_path / "secure", cohorts=FOUR, train__rounds=1), record)  # secure by default
    summary = json.loads((run / "summary.json").read_text())
    assert summary["cohorts"]["finance"]["secure_aggregation"] is True and clear["cohorts"]["finance"]["secure_aggregation"] is False
    err = _max_diff(_adapters(plain, "finance"), _adapters(run, "finance"))
    assert 0 < err <= _bound(4, 16) + 1e-6, err
    assert abs(summary["cohorts"]["finance"]["accuracy"] - clear["cohorts"]["finance"]["accuracy"]) <= 0.05

    # the transcript: no reply carries an update, an example count or a metric in the clear ...
    kinds = {t for t, _ in seen}
    assert {"train", "evaluate", "train.secagg_masked", "evaluate.secagg_masked"} <= kinds
    for t, r in seen:
        if t == "query":
            continue
        assert set(r.content) <= {"secagg", "masked"}, (t, set(r.content))
        arrays = [v for rec in r.content.values() for v in rec.values() if isinstance(v, Array)]
        assert all(t.endswith("secagg_masked") for _ in arrays), t
    # ... and each masked vector is uniform over the modulus and uncorrelated with the site's own vector
    masked = {r.metadata.src_node_id: r.content["masked"]["y"] for t, r in seen if t == "train.secagg_masked"}
    assert len(masked) == 4 and {m.dtype for m in masked.values()} == {"uint32"}
    bits = 20 + 3  # 20 bits + ceil(log2(4 + 1))
    for node, arr in masked.items():
        y = np.frombuffer(arr.data, dtype="<u4").astype(np.float64) / 2**bits
        x = secrets[node].astype(np.float64)
        n = len(y)
        assert abs(y.mean() - 0.5) < 5 * (1 / 12 / n) ** 0.5
        assert np.histogram(y, bins=8, range=(0, 1))[0].min() > n / 8 * 0.8
        assert abs(np.corrcoef(x, y)[0, 1]) < 5 / n**0.5
    # the secure eval metrics equal the clear ones on the same (initial) adapter
    got, want = _lines(run)[0]["cohorts"]["finance"], _lines(plain)[0]["cohorts"]["finance"]
    assert got["accuracy"] == want["accuracy"] and got["eval_examples"] == want["eval_examples"]
    assert got["majority_baseline"] == want["majority_baseline"]
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], abs=1e-5) and got["site_eval_seconds"] is None
    line = _lines(run)[1]["cohorts"]["finance"]
    assert line["sites_trained"] == 4 and line["values_clipped"] == 0 and line["eval_sites"] == 4
    # the loss travels as w loss / 64: its error is 64 times an update value's (weights' error counted twice)
    assert line["train_loss"] == pytest.approx(_lines(plain)[1]["cohorts"]["finance"]["train_loss"], abs=2 * 64 * _bound(4, 16))


@pytest.mark.parametrize("stage", ["train", "train.secagg_share", "train.secagg_masked", "train.secagg_unmask"])
def test_a_site_lost_at_any_stage_is_recovered(make_config, tmp_path: Path, stage: str) -> None:
    def drop(msg, ctx, reply):
        if msg.metadata.message_type == stage and ctx.node_config["partition-id"] == 1:
            return Message(Error(code=1, reason="connection lost"), reply_to=msg)
        return reply

    run = run_with(make_config(tmp_path / "run", cohorts={"finance": {"sites": 5}}, train__rounds=1, secure_aggregation=SECAGG), drop)
    line = _lines(run)[1]["cohorts"]["finance"]
    if stage == "train.secagg_unmask":  # its masked vector arrived: it is in the sum; the others' shares suffice
        assert line["sites_trained"] == 5 and line["sites_failed"] == []
    else:
        assert line["sites_trained"] == 4 and line["sites_failed"] == ["finance-2"]


def test_a_stage_past_its_timeout_aborts_the_round_cleanly(make_config, tmp_path: Path) -> None:
    """3 sites, threshold 3: one site answering stage 3 after the timeout leaves too few; the
    round aborts, the adapter stays as it was, and the run goes on to its end."""
    def slow(msg, ctx, reply):
        if msg.metadata.message_type == "train.secagg_masked" and ctx.node_config["partition-id"] == 0:
            time.sleep(1.5)
        return reply

    cfg = make_config(tmp_path / "run", cohorts={"finance": {"sites": 3}}, train__rounds=1,
                      secure_aggregation={**SECAGG, "threshold": 3, "stage_timeout": 1.0})
    run = run_with(cfg, slow)
    before, after = (x["cohorts"]["finance"] for x in _lines(run))
    assert after["secure_aggregation_aborted"] and after["sites_trained"] == 0
    # the adapter evaluated after the aborted round is the initial one: the same exact secure sums
    assert (after["eval_loss"], after["accuracy"]) == (before["eval_loss"], before["accuracy"])
    assert json.loads((run / "summary.json").read_text())["rounds_completed"] == 1


def test_frozen_a_lora_composes_with_secure_aggregation(make_config, tmp_path: Path) -> None:
    over = {"cohorts": {"finance": {"sites": 3}}, "train__rounds": 1, "lora": {"rank": 4, "alpha": 8.0, "mode": "frozen_a"}}
    plain, _ = simulate(make_config(tmp_path / "plain", secure_aggregation=CLEAR, **over), progress=False)
    secure, summary = simulate(make_config(tmp_path / "secure", secure_aggregation=SECAGG, **over), progress=False)
    a, b = _adapters(plain, "finance"), _adapters(secure, "finance")
    assert summary["cohorts"]["finance"]["secure_aggregation"] is True
    for k in (k for k in a if "lora_A" in k):  # A stays the seed's: only B and the head travel
        np.testing.assert_array_equal(a[k], b[k])
    assert 0 < _max_diff(a, b) <= _bound(3, 16) + 1e-6


def test_client_dp_with_coordinator_noise_and_adaptive_clipping_under_secure_aggregation(make_config, tmp_path: Path) -> None:
    privacy = {"client_dp": True, "client_noise": "coordinator", "adaptive_clip": True, "client_clip_norm": 0.5}
    run, summary = simulate(make_config(tmp_path / "run", cohorts={"finance": {"sites": 3}}, train__rounds=2, privacy=privacy),
                            progress=False)
    assert summary["cohorts"]["finance"]["secure_aggregation"] is True
    lines = _lines(run)[1:]
    assert all(x["cohorts"]["finance"]["sites_trained"] == 3 and "unclipped_fraction_noisy" in x["cohorts"]["finance"] for x in lines)
    norms = [x["cohorts"]["finance"]["client_clip_norm"] for x in lines]
    assert norms[0] == 0.5 and norms[1] != 0.5  # the securely summed count moved the clip norm
    assert summary["privacy"]["client_level"]["cohorts"]["finance"]["epsilon"] > 0


def test_metrics_none_sends_no_evaluation_to_a_secure_cohort(make_config, tmp_path: Path) -> None:
    kinds: list[str] = []

    def record(msg, ctx, reply):
        kinds.append(msg.metadata.message_type)
        return reply

    run = run_with(make_config(tmp_path / "run", cohorts={"finance": {"sites": 3}}, train__rounds=1,
                               secure_aggregation={**SECAGG, "metrics": "none"}), record)
    assert not any(k.startswith("evaluate") for k in kinds)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["cohorts"]["finance"]["accuracy"] is None and summary["cohorts"]["finance"]["secure_aggregation"] is True


def test_a_cohort_below_min_sites_aggregates_in_the_clear_only_when_allowed_and_says_so(make_config, tmp_path: Path, caplog) -> None:
    # without allow_clear such a cohort is skipped (tests/test_fail_closed.py)
    run, summary = simulate(make_config(tmp_path / "run", train__rounds=1, secure_aggregation={**SECAGG, "allow_clear": True}),
                            progress=False)
    assert summary["cohorts"]["finance"]["secure_aggregation"] is False and summary["cohorts_skipped"] == []
    assert "fewer than secure_aggregation.min_sites = 3" in caplog.text and "IN THE CLEAR" in caplog.text


def test_strategies_that_need_individual_updates_are_refused(make_config, tmp_path: Path) -> None:
    each = sorted(name for name, needs in available().items() if needs == "each")
    assert each == ["krum", "median", "multikrum", "trimmed_mean"]
    for name in each:  # each is refused, naming the strategies that compose with secure aggregation
        with pytest.raises(ConfigError, match=f"federation.strategy.*{name} needs each site's update.*secure aggregation never "
                                              "reveals.*use fedavg/fedavgm/fedprox/fedadam/fedyogi/fedadagrad"):
            make_config(tmp_path / "a", federation={"strategy": name})
    assert not get_strategy("fedadam").secure_refusal()
    cfg = make_config(tmp_path / "b", federation={"strategy": "median"}, secure_aggregation=CLEAR)  # without it: allowed
    assert cfg.federation.strategy == "median"


def test_an_impossible_threshold_is_refused_before_anything_is_written(make_config, tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "run", cohorts={"finance": {"sites": 3}}, secure_aggregation={**SECAGG, "threshold": 5})
    with pytest.raises(ConfigError, match="cohort finance .3 sites.*threshold 5 exceeds"):
        simulate(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_sampled_cohort_too_small_for_secure_aggregation_sits_the_round_out(make_config, tmp_path: Path, caplog) -> None:
    cfg = make_config(tmp_path / "run", cohorts={"finance": {"sites": 3}}, train__rounds=3, federation={"site_sample_rate": 0.5},
                      secure_aggregation=SECAGG)
    run, _ = simulate(cfg, progress=False)
    # a round sampling 1 or 2 of the 3 sites sends them nothing: never a sum of fewer than min_sites
    assert {x["cohorts"]["finance"]["sites_selected"] for x in _lines(run)[1:]} <= {0, 3}
    assert "sits out this train round: only" in caplog.text
    # and the round's metrics line says so
    sat_out = [x["cohorts"]["finance"] for x in _lines(run)[1:] if x["cohorts"]["finance"]["sites_selected"] == 0]
    assert sat_out and all("sat out this train round: only" in e["skipped"] for e in sat_out)
