"""Secure aggregation between real processes, and Flower's convention `flwr run .`: a Flower
SuperLink and three `fedlora client` sites (SuperNodes) on loopback, the run submitted with
`flwr run <the repository>` (its pyproject's [tool.flwr.app]) and `--run-config`; the coordinator (fedlora's ServerApp in its own
process) gets only the cohort's sums, the sites' protocol state lives in their SuperNodes'
contexts across messages, and the run directory is what `fedlora simulate` writes."""

from __future__ import annotations

import json
from pathlib import Path

import tomli_w

from deployment import LocalDeployment, live_processes
from fedlora.simulation import demo_data

REPO = Path(__file__).resolve().parents[1]  # `flwr run .` from the repository root


def test_secure_aggregation_between_superlink_and_supernode_processes(tiny_model: Path, tmp_path: Path) -> None:
    files = demo_data.write_cohort(tmp_path / "data", "finance", 3, seed=0, examples_per_site=40, size_skew=0.5, label_skew=1.0)
    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps({
        "seed": 7, "model": {"source": str(tiny_model), "max_length": 32}, "lora": {"rank": 4, "alpha": 8.0},
        "train": {"rounds": 1, "local_steps": 2, "batch_size": 8}, "cohorts": {"finance": {"sites": 3}},
    }))
    out = tmp_path / "run"
    with LocalDeployment(tmp_path / "deploy") as d:
        for i, f in enumerate(files, start=1):
            d.site(f"finance-{i}", "finance", f, tmp_path / "state" / f"finance-{i}")
        done = d.run(REPO, timeout=900, run_config={"config": str(config), "out": str(out), "min-sites": 3, "wait-timeout": 120.0})
    assert live_processes(d.tree) == []  # SuperLink, SuperNodes and every process they started are gone
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cohorts"]["finance"]["secure_aggregation"] is True
    assert summary["cohorts"]["finance"]["sites"] == ["finance-1", "finance-2", "finance-3"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = lines[1]["cohorts"]["finance"]
    assert trained["sites_trained"] == 3 and trained["values_clipped"] == 0 and trained["sites_failed"] == []
    assert trained["eval_sites"] == 3 and trained["site_eval_seconds"] is None  # metrics summed securely too
    assert (out / "adapters" / "finance" / "adapter_model.safetensors").is_file()
