"""The strategies in a real federation (the aggregation pipeline, ``fedlora.server.aggregation``):
server optimisers under secure aggregation, their state through checkpoint and resume, FedProx's
proximal term at the sites, the same weights in the clear and under secure aggregation, and the
strategies that need each update refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import fedlora.simulation.runner as runner
from conftest import interrupt_before
from fedlora.cli import main
from fedlora.client.trainer import LocalTrainSettings, ProximalTerm
from fedlora.errors import ConfigError, RunInterrupted
from fedlora.privacy.secagg_vector import read_sum, site_vector
from fedlora.privacy.quantization import Quantizer
from fedlora.strategies import SiteUpdate, get_strategy
from fedlora.strategies.base import capped_weight, site_weight

SECURE = {"enabled": True, "allow_clear": False}  # three sites per cohort: secure aggregation, fail closed


def _adapter(run: Path, cohort: str) -> bytes:
    return (run / "adapters" / cohort / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("strategy,options", [("fedadam", {"eta": 0.01}), ("fedyogi", {"eta": 0.01}), ("fedprox", {"mu": 0.1}),
                                              ("fedavgm", {"server_momentum": 0.9})])
def test_a_strategy_runs_under_secure_aggregation_and_resumes_bit_identically(make_config, tmp_path: Path, monkeypatch,
                                                                           strategy: str, options: dict) -> None:
    over = dict(train__rounds=3, cohorts={"finance": {"sites": 3}}, secure_aggregation=SECURE,
                federation={"strategy": strategy, "strategy_options": options})
    straight, summary = runner.simulate(make_config(tmp_path / "straight", **over), progress=False)
    assert summary["strategy"] == {"name": strategy, "options": get_strategy(strategy, **options).options()}
    assert summary["cohorts"]["finance"]["secure_aggregation"] is True
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [x["cohorts"]["finance"]["sites_trained"] for x in lines[1:]] == [3, 3, 3]  # every round a secure sum of 3

    with monkeypatch.context() as m:
        interrupt_before(3, m)
        with pytest.raises(RunInterrupted):
            runner.simulate(make_config(tmp_path / "stopped", **over), progress=False)
    ck = tmp_path / "stopped" / "checkpoint"
    stateful = strategy in ("fedadam", "fedyogi", "fedavgm")
    assert (ck / "strategy.safetensors").is_file() == stateful  # server moments are arrays in the checkpoint
    if strategy in ("fedadam", "fedyogi"):
        saved = load_file(str(ck / "strategy.safetensors"))
        assert int(saved["finance/t"]) == 2 and any(np.any(v != 0) for k, v in saved.items() if k.startswith("finance/m/"))
    resumed, again = runner.resume(tmp_path / "stopped", progress=False)
    assert _adapter(resumed, "finance") == _adapter(straight, "finance")
    assert again["cohorts"]["finance"]["accuracy"] == summary["cohorts"]["finance"]["accuracy"]
    assert again["sites"] == summary["sites"] == 3  # the sites that trained before the stop count too


def test_the_server_optimiser_changes_the_adapter_differently_from_fedavg(make_config, tmp_path: Path) -> None:
    """Not a silent FedAvg: the same sites and seeds, another rule, another adapter."""
    over = dict(train__rounds=2, cohorts={"finance": {"sites": 3}}, secure_aggregation=SECURE)
    avg, _ = runner.simulate(make_config(tmp_path / "avg", **over), progress=False)
    adam, _ = runner.simulate(make_config(tmp_path / "adam", federation={"strategy": "fedadam"}, **over), progress=False)
    assert _adapter(avg, "finance") != _adapter(adam, "finance")


def test_secure_and_clear_fedavg_weigh_sites_the_same_past_the_cap(make_config, tmp_path: Path) -> None:
    """The weights are the strategy's, in one place: with a cap below the larger sites' sizes, the
    secure mean equals the clear one (to the quantiser's error), both weighing min(n, cap)."""
    over = dict(train__rounds=1, cohorts={"finance": {"sites": 3}}, demo={"examples_per_site": 60, "size_skew": 0.7},
                federation={"weight_cap": 25.0})
    clear, _ = runner.simulate(make_config(tmp_path / "clear", secure_aggregation={"enabled": False}, **over), progress=False)
    secure, _ = runner.simulate(make_config(tmp_path / "secure", secure_aggregation=SECURE, **over), progress=False)
    a = load_file(str(clear / "adapters" / "finance" / "adapter_model.safetensors"))
    b = load_file(str(secure / "adapters" / "finance" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=5e-5)
    uncapped, _ = runner.simulate(make_config(tmp_path / "uncapped", secure_aggregation={"enabled": False},
                                              **{**over, "federation": {"weight_cap": 1000.0}}), progress=False)
    c = load_file(str(uncapped / "adapters" / "finance" / "adapter_model.safetensors"))
    assert any(not np.allclose(a[k], c[k], atol=1e-6) for k in a)  # the cap did bind: the weights differ from n


def test_the_secure_weight_is_the_clear_weight_over_the_cap() -> None:
    rng = np.random.default_rng(0)
    sizes, cap = [5, 40, 400], 30.0
    deltas = [{"w": rng.normal(0, 0.01, (4, 3)).astype(np.float32)} for _ in sizes]
    clear = get_strategy("fedavg").combine([SiteUpdate(f"s{i}", d, float(n)) for i, (d, n) in enumerate(zip(deltas, sizes))], cap)
    q = Quantizer(clip_range=1.0, bits=24, modulus_bits=32)
    total = sum(site_vector(d, site_weight(n, cap), 0.5, q)[0].astype(np.int64) for d, n in zip(deltas, sizes))
    secure = read_sum(total % 2**q.modulus_bits, {"w": (4, 3)}, q)
    np.testing.assert_allclose(secure.mean_delta["w"], clear["w"], atol=1e-5)
    assert [capped_weight(n, cap) for n in sizes] == [5.0, 30.0, 30.0]
    with pytest.raises(ValueError, match="weight cap"):
        capped_weight(3, 0)


def test_krum_under_secure_aggregation_is_refused_before_anything_is_written(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["simulate", "--strategy", "krum", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "krum needs each site's update" in err and "fedavg/fedavgm/fedprox/fedadam/fedyogi/fedadagrad" in err
    assert not out.exists()
    assert main(["simulate", "--strategy", "fedadam", "--strategy-option", "beta_9=1", "--out", str(out), "--quiet"]) == 2
    assert "has no option beta_9" in capsys.readouterr().err and not out.exists()
    assert main(["simulate", "--strategy", "fedsomething", "--out", str(out), "--quiet"]) == 2
    assert "unknown strategy 'fedsomething'" in capsys.readouterr().err


def test_strategy_options_are_validated_in_the_config(make_config, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="federation.strategy_options.*eta"):
        make_config(tmp_path / "a", federation={"strategy": "fedadam", "strategy_options": {"eta": -1.0}})
    with pytest.raises(ConfigError, match="federation.strategy.*client_dp"):
        make_config(tmp_path / "b", federation={"strategy": "median"}, secure_aggregation={"enabled": False},
                    privacy={"client_dp": True})
    with pytest.raises(ConfigError, match="federation.weight_cap"):
        make_config(tmp_path / "c", federation={"weight_cap": 0.5})


def _settings(mu: float, optimizer: str = "sgd", momentum: float = 0.0) -> LocalTrainSettings:
    return LocalTrainSettings(local_steps=1, local_epochs=0.0, batch_size=1, optimizer=optimizer, learning_rate=0.1,
                              weight_decay=0.0, max_grad_norm=0.0, momentum=momentum, proximal_mu=mu)


def test_the_proximal_step_is_sgd_on_the_proximal_gradient() -> None:
    """With plain SGD, the decoupled proximal step equals adding mu (w - w_global) to the gradient."""
    torch.manual_seed(0)
    w0 = torch.randn(5)
    grads = [torch.randn(5) for _ in range(3)]
    mu, lr = 0.7, 0.1

    p = torch.nn.Parameter(w0.clone())
    prox = ProximalTerm([p], _settings(mu))
    opt = torch.optim.SGD([p], lr=lr)
    q = w0.clone()
    for g in grads:
        p.grad = g.clone()
        prox.step(opt.step)
        q = q - lr * (g + mu * (q - w0))  # SGD on the gradient plus the proximal term's gradient
    torch.testing.assert_close(p.detach(), q)
    idle = torch.nn.Parameter(w0.clone())
    ProximalTerm([idle], _settings(0.0)).step(lambda: None)  # mu = 0: only the optimizer's step
    assert torch.equal(idle.detach(), w0)


def test_fedprox_sends_mu_to_the_sites_and_pulls_their_updates_in(make_config, tmp_path: Path) -> None:
    seen: list[float] = []
    real = runner.make_client_app

    def factory(*a, **kw):
        app = real(*a, **kw)

        def client(msg, ctx):
            if msg.metadata.message_type == "train":
                seen.append(float(msg.content["config"]["train.proximal_mu"]))
            return app(msg, ctx)
        return client

    over = dict(cohorts={"finance": {"sites": 2}}, train={"rounds": 1, "local_steps": 8, "local_epochs": 0.0,
                "batch_size": 8, "optimizer": "sgd", "learning_rate": 0.05})
    runs = {}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(runner, "make_client_app", factory)
        for mu in (0.0, 10.0):  # lr mu = 0.5: each step halves the distance to the global adapter
            runs[mu], _ = runner.simulate(make_config(tmp_path / f"mu{mu}", federation={"strategy": "fedprox", "strategy_options":
                                                                                          {"mu": mu}}, **over), progress=False)
    assert sorted(set(seen)) == [0.0, 10.0]
    moved = {}
    for mu, run in runs.items():
        a = load_file(str(run / "adapters" / "finance" / "adapter_model.safetensors"))
        moved[mu] = float(sum(np.sum(v.astype(np.float64) ** 2) for k, v in a.items() if "lora_B" in k))
    assert moved[10.0] < 0.25 * moved[0.0]  # B starts at 0: the proximal pull keeps it near the global adapter
