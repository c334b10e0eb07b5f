"""Secure aggregation between real processes, and Flower's convention `flwr run .`: a Flower
SuperLink and three `fedlora client` sites (SuperNodes) on loopback, the run submitted with
`flwr run <the repository>` (its pyproject's [tool.flwr.app]) and `--run-config`; the coordinator (fedlora's ServerApp in its own
process) gets only the cohort's sums, the sites' protocol state lives in their SuperNodes'
contexts across messages, and the run directory is what `fedlora simulate` writes.

The same federation then loses a site in the middle of a secure round (SIGKILL to its whole
group once it holds a masked update): that round completes with the other two.
"""

from __future__ import annotations

import json
from pathlib import Path

import tomli_w

from deployment import LocalDeployment, live_processes, wait_for
from fedlora.simulation import demo_data

REPO = Path(__file__).resolve().parents[1]  # `flwr run .` from the repository root


def _reached(log: Path, round_: int, stage: str) -> bool:
    """The SuperNode log shows ``stage``'s message of round ``round_`` (Flower logs ``[RUN r, ROUND n]``
    before each message it receives or sends; the coordinator's group id is the round)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    at = text.find(f"ROUND {round_}]")
    return at >= 0 and f"Receiving: {stage} message" in text[at:]


def test_secure_aggregation_between_superlink_and_supernode_processes_and_a_site_killed_mid_round(tiny_model: Path,
                                                                                                   tmp_path: Path) -> None:
    files = demo_data.write_cohort(tmp_path / "data", "finance", 3, seed=0, examples_per_site=40, size_skew=0.5, label_skew=1.0)
    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps({
        "seed": 7, "model": {"source": str(tiny_model), "max_length": 32},
        "lora": {"rank": 4, "alpha": 8.0, "mode": "standard"},  # the tests' regime (tests/conftest.py's tiny_config)
        "train": {"rounds": 2, "local_steps": 2, "local_epochs": 0.0, "batch_size": 8, "optimizer": "adamw", "learning_rate": 0.01},
        "cohorts": {"finance": {"sites": 3}},
        "privacy": {"dp": False},  # the secure sums of the eval metrics are checked: DP (on by default) keeps them at the sites
        "secure_aggregation": {"stage_timeout": 30.0},  # how long the coordinator waits for the killed site
    }))
    out = tmp_path / "run"
    with LocalDeployment(tmp_path / "deploy") as d:
        for i, f in enumerate(files, start=1):
            d.site(f"finance-{i}", "finance", f, tmp_path / "state" / f"finance-{i}")
        d.submit(REPO, run_config={"config": str(config), "out": str(out), "min-sites": 3, "wait-timeout": 120.0})
        victim_log = tmp_path / "state" / "finance-3" / "supernode.log"
        # round 2's train message reached the victim and its keys went back: now it holds a masked update
        wait_for(lambda: _reached(victim_log, 2, "train.secagg_share") or d.procs["flwr-run"].poll() is not None, 600,
                 "finance-3 to reach stage 2 of round 2")
        d.kill("finance-3")
        assert d.wait("flwr-run", 900) == 0, d.log("flwr-run")[-6000:]
    assert live_processes(d.tree) == []  # SuperLink, SuperNodes and every process they started are gone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cohorts"]["finance"]["secure_aggregation"] is True
    assert summary["cohorts"]["finance"]["sites"] == ["finance-1", "finance-2", "finance-3"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = lines[1]["cohorts"]["finance"]  # round 1: every site
    assert trained["sites_trained"] == 3 and trained["values_clipped"] == 0 and trained["sites_failed"] == []
    assert trained["eval_sites"] == 3 and trained["site_eval_seconds"] is None  # metrics summed securely too
    assert (out / "adapters" / "finance" / "adapter_model.safetensors").is_file()
    # round 2: finance-3 died holding a masked update; the others' shares recover the sum of the two
    line = lines[2]["cohorts"]["finance"]
    assert line["sites_failed"] == ["finance-3"] and line["sites_trained"] == 2, line
    assert "secure_aggregation_aborted" not in line
    assert summary["rounds_completed"] == 2
