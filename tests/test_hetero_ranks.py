"""Heterogeneous LoRA ranks over a shared frozen A: a site trains the first r <= R components and
sends its B update zero-padded to the cohort's rank R, so the aggregate is the weighted average of
the sites' products B_i A_i[:r_i], in the clear and under secure aggregation."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.common.config import parse_config_args
from safetensors.numpy import load_file

import fedlora.client.agent as agent
import fedlora.client.app as client_app
from fedlora.cli import main
from fedlora.client.dp_trainer import DpSgdSettings, train_local_dp
from fedlora.client.site import SiteSpec
from fedlora.client.trainer import LocalTrainSettings, train_local
from fedlora.config import config_from_dict
from fedlora.errors import ConfigError, ModelError
from fedlora.model import ModelSpec, get_runtime
from fedlora.privacy.randomness import RoundSeeds
from fedlora.records import from_record
from fedlora.simulation.demo_data import LABELS, generate_site
from fedlora.simulation.runner import plan_sites
from fedlora.strategies.lora_math import pad_rank, truncate_rank
from fedlora.tasks import LabelledTexts

from conftest import run_with

R = 4
RANKS = {"finance-2": 2, "finance-3": 1}  # finance-1 trains the cohort's rank R
SITE_RANK = {"finance-1": R, **RANKS}


# ---- the algebra ---------------------------------------------------------------------
def test_padded_b_over_the_shared_a_averages_the_sites_products_exactly() -> None:
    rng = np.random.default_rng(15)
    out_f, in_f = 7, 5
    a = rng.normal(size=(R, in_f))  # frozen, shared: every site uses its first r rows
    ranks, w = [R, 2, 1, 3], np.array([3.0, 1.0, 5.0, 2.0])
    bs = [rng.normal(size=(out_f, r)) for r in ranks]
    padded = [pad_rank({"x.lora_B.weight": b}, R)["x.lora_B.weight"] for b in bs]
    assert all(p.shape == (out_f, R) for p in padded)
    aggregate = sum(wk * p for wk, p in zip(w, padded)) @ a / w.sum()
    products = sum(wk * (b @ a[:r]) for wk, b, r in zip(w, bs, ranks)) / w.sum()
    np.testing.assert_allclose(aggregate, products, rtol=0, atol=1e-12)
    # averaging the factors at each site's own rank would not give it
    assert np.abs(sum(wk * p for wk, p in zip(w, padded)) @ a / w.sum() - bs[0] @ a).max() > 0.1


def test_truncate_and_pad_cut_and_fill_the_rank_axis_of_a_and_b_only() -> None:
    rng = np.random.default_rng(1)
    state = {"l.lora_A.weight": rng.normal(size=(R, 6)), "l.lora_B.weight": rng.normal(size=(3, R)), "classifier.weight": np.ones((2, 6))}
    cut = truncate_rank(state, 2)
    assert cut["l.lora_A.weight"].shape == (2, 6) and cut["l.lora_B.weight"].shape == (3, 2)
    np.testing.assert_array_equal(cut["l.lora_A.weight"], state["l.lora_A.weight"][:2])
    np.testing.assert_array_equal(cut["l.lora_B.weight"], state["l.lora_B.weight"][:, :2])
    assert cut["classifier.weight"] is state["classifier.weight"] and set(cut) == set(state)
    back = pad_rank(cut, R)
    np.testing.assert_array_equal(back["l.lora_B.weight"][:, :2], state["l.lora_B.weight"][:, :2])
    assert not back["l.lora_B.weight"][:, 2:].any() and not back["l.lora_A.weight"][2:].any()
    with pytest.raises(ModelError, match="rank 5: it has rank 4"):
        truncate_rank(state, 5)
    with pytest.raises(ModelError, match=">= 1"):
        truncate_rank(state, 0)
    with pytest.raises(ModelError, match="already has rank 4"):
        pad_rank(state, 2)


# ---- the site's model ------------------------------------------------------------------
def _spec(tiny_model: Path, mode: str = "frozen_a") -> ModelSpec:
    return ModelSpec(str(tiny_model), 32, "sequence_classification", R, 8.0, 0.0, ("query", "value"), mode)


def _examples(rt, n: int = 32):
    df = generate_site("finance", 0, 1, seed=0, examples_per_site=n)
    y = np.array([LABELS["finance"].index(v) for v in df["label"]])
    return rt.task.encode(rt.tokenizer, LabelledTexts(tuple(df["text"]), y), LABELS["finance"], 32)


def _loss(rt, state, examples) -> float:
    import torch

    from fedlora.client.trainer import load_global

    load_global(rt, state, 0, "finance", 3)
    rt.model.eval()
    with torch.no_grad():
        batch = rt.task.batch(examples, np.arange(len(examples)), int(rt.tokenizer.pad_token_id), rt.device)
        loss, _ = rt.task.loss(rt.model, batch)
    rt.model.train()
    return float(loss)


def test_a_lower_rank_site_keeps_the_cohort_scaling_and_computes_a_slice_of_its_product(tiny_model: Path) -> None:
    full, low = get_runtime(_spec(tiny_model), "cpu"), get_runtime(_spec(tiny_model).at_rank(2), "cpu")
    assert (full.rank, low.rank) == (R, 2) and low.spec.lora_rank == R
    from peft.tuners.lora import LoraLayer

    scalings = [m.scaling["default"] for rt in (full, low) for m in rt.peft_model.modules() if isinstance(m, LoraLayer)]
    assert scalings and all(s == pytest.approx(8.0 / R, rel=1e-12) for s in scalings)  # alpha / R at both ranks
    assert low.adapter_shapes(3) == full.adapter_shapes(3)  # the wire carries the cohort's shapes
    a_full = full.initial_adapter(0, "finance", 3, include_frozen=True)
    a_low = low.initial_adapter(0, "finance", 3, include_frozen=True, rank=2)
    for k in (k for k in a_full if ".lora_A." in k):
        np.testing.assert_array_equal(a_low[k], a_full[k][:2])  # the same shared A, its first rows

    rng = np.random.default_rng(0)
    state = {k: (rng.normal(size=v.shape) * 0.5).astype(np.float32) if ".lora_B." in k else v
             for k, v in full.initial_adapter(0, "finance", 3).items()}
    within = {k: v.copy() for k, v in state.items()}
    for k in (k for k in within if ".lora_B." in k):
        within[k][:, 2:] = 0  # B's columns beyond r = 2
    examples = _examples(full)
    # the rank-2 site's model is the cohort's model restricted to the first 2 components
    assert _loss(low, state, examples) == pytest.approx(_loss(full, within, examples), rel=1e-5, abs=1e-6)
    assert abs(_loss(full, state, examples) - _loss(full, within, examples)) > 1e-4  # the cut components do matter


def test_a_lower_rank_update_has_the_cohort_shapes_and_is_zero_beyond_its_rank(tiny_model: Path) -> None:
    low = get_runtime(_spec(tiny_model).at_rank(2), "cpu")
    state = low.initial_adapter(0, "finance", 3)
    examples = _examples(low)
    settings = LocalTrainSettings(local_steps=2, local_epochs=0.0, batch_size=16, optimizer="adamw", learning_rate=0.05,
                                  weight_decay=0.01, max_grad_norm=1.0)
    plain = train_local(low, state, examples, settings, seed=0, site="finance-2", cohort="finance", num_labels=3, round_=1)
    dp, event = train_local_dp(low, state, examples, settings, DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5),
                               seed=0, site="finance-2", cohort="finance", num_labels=3, round_=1,
                               seeds=RoundSeeds.reproducible(0, "finance-2", 1))
    assert event.steps == 2
    for res in (plain, dp):  # weight decay and DP noise touch only the site's own components
        assert {k: v.shape for k, v in res.delta.items()} == low.adapter_shapes(3)
        for k, v in res.delta.items():
            if ".lora_B." in k:
                assert v[:, :2].any() and not v[:, 2:].any(), k


def test_ranks_the_mode_or_the_cohort_do_not_allow_are_refused(tiny_model: Path, make_config, tmp_path: Path) -> None:
    spec = _spec(tiny_model)
    assert spec.at_rank(0) == spec and spec.at_rank(R) == spec  # the cohort's own rank: nothing changes
    with pytest.raises(ModelError, match="exceeds the cohort's lora.rank 4"):
        spec.at_rank(5)
    with pytest.raises(ModelError, match=">= 1"):
        spec.at_rank(-1)
    with pytest.raises(ModelError, match="frozen_a.*padding A is not exact"):
        _spec(tiny_model, "standard").at_rank(2)
    with pytest.raises(ModelError, match="frozen_a"):
        _spec(tiny_model, "probe").at_rank(2)
    assert "model.site_rank" not in spec.at_rank(2).to_flat()  # the rank never travels
    assert ModelSpec.from_flat(spec.to_flat() | {"model.site_rank": 1}).site_rank == 0  # nor can the coordinator set it

    frozen = {"mode": "frozen_a", "rank": R, "alpha": 8.0}
    with pytest.raises(ConfigError, match=r"lora.site_ranks.finance-1 = 5: must be an integer in \[1, lora.rank = 4\]"):
        make_config(tmp_path, lora=frozen | {"site_ranks": {"finance-1": 5}})
    with pytest.raises(ConfigError, match=r"lora.site_ranks.finance-1 = 0"):
        make_config(tmp_path, lora=frozen | {"site_ranks": {"finance-1": 0}})
    with pytest.raises(ConfigError, match="needs lora.mode = 'frozen_a'.*padding A is not exact"):
        make_config(tmp_path, lora={"mode": "standard", "rank": R, "site_ranks": {"finance-1": 2}})
    with pytest.raises(ConfigError, match="lora.site_ranks.bank-7 = 2: no such site; sites: finance-1"):
        plan_sites(make_config(tmp_path, lora=frozen | {"site_ranks": {"bank-7": 2}}))


def test_fedlora_client_lora_rank_reaches_the_site(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "bank.csv"
    generate_site("finance", 0, 1, seed=0, examples_per_site=20).to_csv(data, index=False)
    seen = []
    monkeypatch.setattr(agent, "run_site", lambda opts, **kw: seen.append(opts))
    base = ["client", "--server", "127.0.0.1:9092", "--data", str(data), "--domain", "finance", "--insecure",
            "--state-dir", str(tmp_path / "state")]
    assert main([*base, "--lora-rank", "2"]) == 0
    opts = seen[-1]
    assert opts.lora_rank == 2
    site = SiteSpec.from_node_config(parse_config_args([agent.node_config(opts)]))
    assert site.lora_rank == 2
    assert client_app.site_model(_spec(tiny_model).to_flat(), site).site_rank == 2
    with pytest.raises(ModelError, match="frozen_a"):
        client_app.site_model(_spec(tiny_model, "standard").to_flat(), site)  # refused when the coordinator names its model
    assert main(base) == 0 and seen[-1].lora_rank is None and "lora-rank" not in agent.node_config(seen[-1])
    with pytest.raises(ConfigError, match="--lora-rank = 0"):
        agent.check_site(agent.SiteOptions(server="127.0.0.1:9092", data=data, domain="finance", name="finance", insecure=True,
                                           lora_rank=0))
    with pytest.raises(ConfigError, match="lora-rank"):
        SiteSpec.from_node_config({"domain": "finance", "data-path": str(data), "lora-rank": "0"})


# ---- end to end ------------------------------------------------------------------------
def _record_training(monkeypatch) -> dict[str, tuple[dict, int]]:
    """Each site's update as its trainer produced it (before any masking), by site name."""
    seen: dict[str, tuple[dict, int]] = {}
    real = client_app.train_local

    def recording(*args, **kwargs):
        res = real(*args, **kwargs)
        seen[kwargs["site"]] = ({k: np.asarray(v, np.float64) for k, v in res.delta.items()}, res.num_examples)
        return res
    monkeypatch.setattr(client_app, "train_local", recording)
    return seen


def _final(run: Path) -> dict[str, np.ndarray]:
    raw = load_file(str(run / "adapters" / "finance" / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model."): v.astype(np.float64) for k, v in raw.items()}


def _check_updates(seen: dict[str, tuple[dict, int]], shapes: dict) -> None:
    assert set(seen) == set(SITE_RANK)
    for name, (delta, _) in seen.items():
        assert {k: v.shape for k, v in delta.items()} == shapes  # every update has the cohort's shapes
        r = SITE_RANK[name]
        for k, v in delta.items():
            if ".lora_B." in k:
                assert v[:, :r].any() and not v[:, r:].any(), (name, k)  # its B columns beyond r untouched


def _mean_of_products(seen: dict[str, tuple[dict, int]], a: dict[str, np.ndarray], key: str) -> np.ndarray:
    w = {name: float(min(n, 1000)) for name, (_, n) in seen.items()}
    total = sum(w.values())
    return sum(w[s] * (d[key][:, :SITE_RANK[s]] @ a[key.replace("lora_B", "lora_A")][:SITE_RANK[s]]) for s, (d, _) in seen.items()) / total


def test_three_sites_of_ranks_4_2_1_aggregate_to_the_average_of_their_products(make_config, tmp_path: Path, monkeypatch) -> None:
    over = dict(train__rounds=1, cohorts={"finance": {"sites": 3}},
                lora={"mode": "frozen_a", "rank": R, "alpha": 8.0, "site_ranks": RANKS})
    messages: list = []

    def watch(msg, ctx, reply):
        messages.append(msg)
        if msg.metadata.message_type == "train" and reply.has_content():
            sent, _ = from_record(reply.content["update"], None)
            updates[int(ctx.node_config["partition-id"])] = {k: np.shape(v) for k, v in sent.items()}
        return reply

    # in the clear: every update visible, the aggregate exact
    updates: dict[int, dict] = {}
    seen = _record_training(monkeypatch)
    cfg = make_config(tmp_path / "clear", secure_aggregation={"enabled": False, "allow_clear": True}, **over)
    clear = run_with(cfg, watch)
    rt = get_runtime(ModelSpec.from_config(cfg), "cpu")
    shapes = rt.adapter_shapes(3)
    _check_updates(seen, shapes)
    assert len(updates) == 3 and all(u == shapes for u in updates.values())  # on the wire: the cohort's shapes
    final = _final(clear)
    a = rt.initial_adapter(cfg.seed, "finance", 3, include_frozen=True)
    b_keys = [k for k in final if ".lora_B." in k]
    assert b_keys
    for k in b_keys:
        np.testing.assert_array_equal(final[k.replace("lora_B", "lora_A")], a[k.replace("lora_B", "lora_A")])
        np.testing.assert_allclose(final[k] @ a[k.replace("lora_B", "lora_A")], _mean_of_products(seen, a, k), rtol=1e-5, atol=1e-7)
    # the ranks are the sites' business: no message names one, every message carries the cohort's rank
    assert any("config" in m.content for m in messages)
    for m in (m for m in messages if "config" in m.content):
        config = m.content["config"]
        assert int(config["model.lora_rank"]) == R and not any("site_rank" in str(k) or "site_ranks" in str(k) for k in config)
    saved = config_from_dict(tomllib.loads((clear / "config.toml").read_text(encoding="utf-8")))
    assert saved.lora.site_ranks == RANKS  # the run directory's config keeps them (resume)
    clear_deltas = seen.copy()

    # under secure aggregation: runs, the sites' updates are the same, the sum is the clear one up to quantisation
    seen.clear()
    secure = run_with(make_config(tmp_path / "secure", secure_aggregation={"enabled": True, "allow_clear": False}, **over))
    summary = json.loads((secure / "summary.json").read_text())
    assert summary["cohorts"]["finance"]["secure_aggregation"] is True
    lines = [json.loads(x) for x in (secure / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["cohorts"]["finance"]["sites_trained"] == 3
    _check_updates(seen, shapes)
    for name, (delta, n) in seen.items():
        assert n == clear_deltas[name][1]
        for k in delta:
            np.testing.assert_allclose(delta[k], clear_deltas[name][0][k], rtol=0, atol=1e-6)
    masked = _final(secure)
    step = 2 * 1.0 / (2**20 - 1)  # the quantiser's step over [-1, 1] at 20 bits: the secure mean is off by at most 3 half-steps / sum(w)
    bound = 3 * (step / 2) / (sum(min(n, 1000) for _, n in seen.values()) / 1000)
    for k in b_keys:
        assert np.abs(masked[k] - final[k]).max() <= bound + 1e-6
