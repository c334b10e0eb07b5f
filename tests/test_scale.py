"""Large populations: evaluation on a Poisson sample (``federation.eval_sample_rate``), a lazy
population whose sites exist only once sampled, and an exact resume of a sampled run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedlora.simulation.runner as runner
from fedlora.config import config_from_dict
from fedlora.errors import ConfigError, RunInterrupted
from fedlora.privacy.key_signing import InMemoryCA
from fedlora.simulation import demo_data

# 2 cohorts of 1,000 virtual sites (above runner.LAZY_FROM: a lazy population), ~10 of each sampled per round
LARGE = dict(cohorts={"finance": {"sites": 1000}, "medical": {"sites": 1000}}, demo={"examples_per_site": 20},
             train__local_steps=1, federation={"site_sample_rate": 0.01, "eval_sample_rate": 0.01},
             secure_aggregation={"min_sites": 3})


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("rate", [0, 1.5, -0.1, True, "0.5"])
def test_eval_sample_rate_must_be_a_probability(rate: object) -> None:
    with pytest.raises(ConfigError, match="federation.eval_sample_rate"):
        config_from_dict({"federation": {"eval_sample_rate": rate}})
    assert config_from_dict({"federation": {"eval_sample_rate": 0.25}}).federation.eval_sample_rate == 0.25
    assert config_from_dict({}).federation.eval_sample_rate == 1.0  # default: every site evaluates


def test_evaluation_on_a_sample_asks_only_the_sampled_sites(make_config, tmp_path: Path, monkeypatch) -> None:
    """Each evaluation asks an independent Poisson sample of every cohort (counted in
    ``eval_sites_selected``); only the sampled sites evaluate, and their counts are the metrics'."""
    asked: list[tuple[int, str]] = []
    real = runner.make_client_app

    def factory(sites, **kw):
        app = real(sites, **kw)

        def client(msg, ctx):
            if msg.metadata.message_type == "evaluate":
                asked.append((int(msg.content["config"]["round"]), sites[int(ctx.node_config["partition-id"])].name))
            return app(msg, ctx)
        return client

    monkeypatch.setattr(runner, "make_client_app", factory)
    cfg = make_config(tmp_path / "run", cohorts={"finance": {"sites": 12}}, train__rounds=2, federation={"eval_sample_rate": 0.5})
    run, _ = runner.simulate(cfg, progress=False)
    lines = _lines(run)
    selected = [line["cohorts"]["finance"]["eval_sites_selected"] for line in lines]
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert sum(selected) == len(asked) and all(0 <= n < 12 for n in selected) and sum(selected) > 0
    assert len({frozenset(s for r, s in asked if r == k) for k in (0, 1, 2)}) > 1  # a fresh sample each time
    sizes = {s["name"]: s["num_rows"] for s in json.loads((run / "partition.json").read_text())["sites"]}
    held_out = lambda n: max(1, -(-n // 5))  # noqa: E731 - ceil(eval_fraction 0.2 * n) rows each site evaluates on
    for line in lines:
        sites = [s for r, s in asked if r == line["round"]]
        assert line["cohorts"]["finance"]["eval_examples"] == sum(held_out(sizes[s]) for s in sites)


def test_a_secure_eval_sample_below_the_minimum_sits_out_named(make_config, tmp_path: Path) -> None:
    """With secure aggregation the eval sample is the sum's group: a sample below min_sites sends
    nothing and is named (``eval_skipped``), as a train sample is (``skipped``)."""
    cfg = make_config(tmp_path / "run", cohorts={"finance": {"sites": 4}}, train__rounds=1, train__local_steps=1,
                      federation={"eval_sample_rate": 0.05}, secure_aggregation={"min_sites": 3})
    run, _ = runner.simulate(cfg, progress=False)
    for line in _lines(run):
        entry = line["cohorts"]["finance"]
        assert entry["eval_sites_selected"] < 3  # (seed 7: no eval sample reached 3 sites)
        assert "sat out this evaluate round" in entry["eval_skipped"] and entry["accuracy"] is None
        assert "secure_aggregation_eval_aborted" not in entry


def test_a_lazy_population_makes_only_the_sampled_sites(make_config, tmp_path: Path, monkeypatch) -> None:
    """2,000 virtual sites, 1 % sampled: only the sites sent a message get data, keys and a
    certificate; nothing is written per site up front, and nobody is asked at discovery."""
    made: list[int] = []
    real_generate, real_credentials = demo_data.generate_site, InMemoryCA.credentials
    monkeypatch.setattr(demo_data, "generate_site", lambda domain, index, *a, **kw: made.append(index) or real_generate(domain, index, *a, **kw))
    issued: list[str] = []
    monkeypatch.setattr(InMemoryCA, "credentials", lambda self, name: issued.append(name) or real_credentials(self, name))
    kinds: set[str] = set()
    real = runner.make_client_app

    def factory(sites, **kw):
        app = real(sites, **kw)
        return lambda msg, ctx: kinds.add(msg.metadata.message_type) or app(msg, ctx)

    monkeypatch.setattr(runner, "make_client_app", factory)
    run, summary = runner.simulate(make_config(tmp_path / "run", train__rounds=1, **LARGE), progress=False)
    lines = _lines(run)
    worked = sum(e.get("sites_selected", 0) + e.get("eval_sites_selected", 0) for line in lines for e in line["cohorts"].values())
    assert 0 < len(made) <= worked < 100  # rows made only for sites asked to work (a site asked twice may be read again)
    assert 0 < len(set(issued)) == len(issued) <= worked  # each key and certificate issued once, for a site asked to work
    assert "query" not in kinds and not (run / "demo_data").exists()
    assert summary["cohorts"]["finance"]["secure_aggregation"] is True and summary["sites"] > 0
    table = json.loads((run / "partition.json").read_text())
    assert table["sites"] == [] and {g["cohort"]: g["sites"] for g in table["generated"]} == {"finance": 1000, "medical": 1000}
    assert len(json.loads((run / "sites.json").read_text())["finance"]) == 1000  # every site joined, none was materialised for it


def test_a_resumed_sampled_run_ends_with_the_adapters_of_one_that_never_stopped(make_config, tmp_path: Path, monkeypatch) -> None:
    """The coordinator's RNG (train and eval samples) is checkpointed: stopped after round 1 and
    resumed, a lazy sampled run under secure aggregation ends with the same adapters, bit for bit."""
    over = dict(train__rounds=2, **LARGE)
    straight, _ = runner.simulate(make_config(tmp_path / "straight", **over), progress=False)
    real = runner.make_client_app

    def factory(*a, **kw):
        app = real(*a, **kw)

        def client(msg, ctx):
            if msg.metadata.message_type == "train" and int(msg.content["config"]["round"]) == 2:
                raise KeyboardInterrupt
            return app(msg, ctx)
        return client

    with monkeypatch.context() as m:
        m.setattr(runner, "make_client_app", factory)
        with pytest.raises(RunInterrupted, match="--resume"):
            runner.simulate(make_config(tmp_path / "stopped", **over), progress=False)
    run, summary = runner.resume(tmp_path / "stopped", progress=False)
    assert summary["resumed_after_round"] == 1
    for cohort in ("finance", "medical"):
        adapter = lambda p: (p / "adapters" / cohort / "adapter_model.safetensors").read_bytes()  # noqa: E731
        assert adapter(run) == adapter(straight)
    stable = lambda p: [{c: {k: v for k, v in e.items() if "seconds" not in k} for c, e in x["cohorts"].items()}  # noqa: E731
                        for x in _lines(p)]
    assert stable(run) == stable(straight)  # the same samples, sums and metrics in every round
