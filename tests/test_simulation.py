"""End-to-end federations in one process, on the real ServerApp, ClientApp and model code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora.simulation.runner import simulate


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_federation_writes_a_complete_run_directory(make_config, tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "run", train__rounds=3)
    run, summary = simulate(cfg, progress=False)
    assert {p.name for p in run.iterdir()} >= {"config.toml", "metrics.jsonl", "summary.json", "sites.json", "adapters", "demo_data"}
    lines = _lines(run)
    assert [x["round"] for x in lines] == [0, 1, 2, 3]
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["rounds_completed"] == 3 and summary["sites"] == 4
    assert summary["bytes_up"] == sum(x["bytes_up"] for x in lines) > 0
    assert summary["bytes_down"] == sum(x["bytes_down"] for x in lines) > summary["bytes_up"]
    for name in ("finance", "medical"):
        c = summary["cohorts"][name]
        assert 0 <= c["majority_baseline"] <= 1 and 0 <= c["accuracy"] <= 1
        assert all(x["cohorts"][name].get("sites_failed", []) == [] for x in lines)
        weights = load_file(str(run / "adapters" / name / "adapter_model.safetensors"))
        head = load_file(str(run / "adapters" / name / "head.safetensors"))
        assert set(head) == {"classifier.weight", "classifier.bias"} and head["classifier.weight"].shape[0] == len(c["labels"])
        assert any(k.endswith("lora_B.weight") and np.abs(v).max() > 0 for k, v in weights.items()), "the adapter moved"
    assert json.loads((run / "sites.json").read_text()) == {"finance": ["finance-1", "finance-2"], "medical": ["medical-1", "medical-2"]}
    demo = (run / "demo_data" / "finance-1.synthetic.csv").read_text().splitlines()
    assert demo[0] == "text,label,synthetic" and demo[1].endswith(",True")


def test_packaged_model_federation_improves_and_beats_the_majority_baseline(tmp_path: Path) -> None:
    """The packaged 22.7M-parameter MiniLM (a 1-layer cut of it cannot learn with LoRA alone)."""
    from fedlora.config import config_from_dict

    cfg = config_from_dict({"seed": 1, "out": str(tmp_path / "run"), "train": {"rounds": 3, "local_steps": 12, "local_epochs": 0.0},
                            "privacy": {"dp": False}, "demo": {"examples_per_site": 160}, "cohorts": {"medical": {"sites": 2}},
                            "secure_aggregation": {"allow_clear": True}})  # 2 sites: in the clear, as this test always ran
    run, summary = simulate(cfg, progress=False)
    lines = _lines(run)
    first, last = lines[0]["cohorts"]["medical"], lines[-1]["cohorts"]["medical"]
    assert last["eval_loss"] < first["eval_loss"]
    assert last["accuracy"] >= first["accuracy"] + 0.2, (first, last)
    c = summary["cohorts"]["medical"]
    assert c["accuracy"] >= c["majority_baseline"] + 0.2, c


def test_the_defaults_learn_under_dp_and_stay_within_budget(tmp_path: Path) -> None:
    """The default run (DP-SGD at epsilon 8, secure aggregation, the probe head) on one demo cohort of
    3 sites: clearly above the majority baseline, every site within its budget, as `make demo` shows."""
    from fedlora.config import config_from_dict

    cfg = config_from_dict({"seed": 0, "out": str(tmp_path / "run"), "cohorts": {"medical": {"sites": 3}}})
    assert cfg.privacy.dp and cfg.secure_aggregation.enabled
    _, summary = simulate(cfg, progress=False)
    c = summary["cohorts"]["medical"]
    assert c["secure_aggregation"] and c["accuracy"] >= c["majority_baseline"] + 0.10, c
    assert summary["warnings"] == []
    sites = summary["privacy"]["sites"]
    assert len(sites) == 3 and all(0 < v["epsilon"] <= 8.0 for v in sites.values()), sites


def test_real_data_cohort_is_split_across_its_sites(make_config, tmp_path: Path) -> None:
    import pandas as pd

    rng = np.random.default_rng(0)
    words = {"up": "gains rally surge", "down": "losses slump fall"}
    rows = [(f"stock {rng.choice(words[y].split())} today {i}", y) for i, y in enumerate(rng.choice(["up", "down"], 90))]
    path = tmp_path / "market.parquet"
    pd.DataFrame(rows, columns=["headline", "direction"]).to_parquet(path)
    cfg = make_config(tmp_path / "run", cohorts={"markets": {"sites": 3, "data": str(path), "text_column": "headline",
                                                                        "label_column": "direction"}})
    run, summary = simulate(cfg, progress=False)
    assert summary["cohorts"]["markets"]["labels"] == ["down", "up"]
    assert summary["cohorts"]["markets"]["sites"] == ["markets-1", "markets-2", "markets-3"]
    assert _lines(run)[0]["cohorts"]["markets"]["eval_examples"] == 3 * 6  # ceil(0.2 * 30) per site
    assert not (run / "demo_data").exists()


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_half_precision_wire_halves_the_upload(make_config, tmp_path: Path, wire: str) -> None:
    _, full = simulate(make_config(tmp_path / "a", train__rounds=1), progress=False)
    _, half = simulate(make_config(tmp_path / "b", train__rounds=1, federation={"wire_dtype": wire}), progress=False)
    assert half["bytes_up"] < 0.55 * full["bytes_up"]
    assert abs(half["cohorts"]["finance"]["accuracy"] - full["cohorts"]["finance"]["accuracy"]) <= 0.2


def test_existing_run_directory_is_never_overwritten(make_config, tmp_path: Path) -> None:
    from fedlora.errors import ConfigError

    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        simulate(make_config(out), progress=False)
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_eval_every_skips_evaluations_but_not_the_last(make_config, tmp_path: Path) -> None:
    run, summary = simulate(make_config(tmp_path / "run", train__rounds=3, train__eval_every=2), progress=False)
    evaluated = [x["round"] for x in _lines(run) if "accuracy" in x["cohorts"]["finance"]]
    assert evaluated == [0, 2, 3]
    assert summary["cohorts"]["finance"]["accuracy"] == _lines(run)[-1]["cohorts"]["finance"]["accuracy"]


def test_the_base_model_is_loaded_once_for_all_sites_and_rounds(make_config, tmp_path: Path, monkeypatch) -> None:
    from fedlora import model

    monkeypatch.setattr(model, "_RUNTIMES", {})
    loads = []
    real_init = model.LoraRuntime.__init__

    def counting_init(self, *args, **kwargs):
        loads.append(args[0])
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(model.LoraRuntime, "__init__", counting_init)
    _, summary = simulate(make_config(tmp_path / "run", train__rounds=3), progress=False)
    assert summary["sites"] == 4 and summary["rounds_completed"] == 3
    assert len(loads) == 1, "one base model for the coordinator and every virtual site, across rounds"


def test_real_financial_phrasebank_slice(make_config, tmp_path: Path, shared_data: Path) -> None:
    """Real labelled data: 300 rows of the Financial PhraseBank split across 3 sites."""
    import pandas as pd

    source = shared_data / "finance_fpb" / "data.csv"
    part = tmp_path / "fpb.csv"
    pd.read_csv(source).sample(n=300, random_state=0).to_csv(part, index=False)
    cfg = make_config(tmp_path / "run", train__rounds=1, cohorts={"finance": {"sites": 3, "data": str(part)}})
    run, summary = simulate(cfg, progress=False)
    c = summary["cohorts"]["finance"]
    assert c["labels"] == ["negative", "neutral", "positive"]
    assert _lines(run)[0]["cohorts"]["finance"]["eval_examples"] == 60
