"""Secure aggregation in the rounds: same result as in the clear (within the quantisation bound),
the coordinator's view holds no individual update or count, dropouts recover, small cohorts say so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message

from conftest import run_with
from fedlora.records import from_record
from fedlora.simulation.runner import simulate
from safetensors.numpy import load_file

SECAGG = {"enabled": True, "bits": 20, "clip_range": 1.0}


def _adapters(run: Path, cohort: str) -> dict[str, np.ndarray]:
    return load_file(str(run / "adapters" / cohort / "adapter_model.safetensors"))


def test_secure_sum_matches_the_clear_sum_and_the_coordinator_sees_no_update(make_config, tmp_path: Path) -> None:
    cohorts = {"finance": {"sites": 4}}
    plain, plain_summary = simulate(make_config(tmp_path / "plain", cohorts=cohorts, train__rounds=1), progress=False)
    seen: list = []

    def record(msg, ctx, reply):
        seen.append((msg.metadata.message_type, reply))
        return reply

    run = run_with(make_config(tmp_path / "secure", cohorts=cohorts, train__rounds=1, secure_aggregation=SECAGG), record)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["cohorts"]["finance"]["secure_aggregation"] is True
    a, b = _adapters(plain, "finance"), _adapters(run, "finance")
    # the weighted mean of 4 updates is off by at most 4 (step / 2) / sum(w), w = n / 1000 >= 16 / 1000 each
    step = 2 * 1.0 / (2**20 - 1)
    bound = 4 * (step / 2) / (4 * 16 / 1000)
    err = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert 0 < err <= bound + 1e-6, (err, bound)
    assert summary["cohorts"]["finance"]["accuracy"] == pytest.approx(plain_summary["cohorts"]["finance"]["accuracy"], abs=0.1)
    # the transcript: no train reply holds an update, an example count or a loss in the clear
    train = [(t, r) for t, r in seen if t.startswith("train")]
    assert train and all("update" not in r.content and "metrics" not in r.content for _, r in train)
    masked = [r.content["masked"]["y"] for t, r in train if t == "train.secagg_masked"]
    assert len(masked) == 4 and {m.dtype for m in masked} == {"uint32"}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()[1:]]
    assert all(x["cohorts"]["finance"]["sites_trained"] == 4 and x["cohorts"]["finance"]["values_clipped"] == 0 for x in lines)


def test_a_site_lost_after_sharing_keys_is_recovered(make_config, tmp_path: Path) -> None:
    def drop(msg, ctx, reply):
        if msg.metadata.message_type == "train.secagg_masked" and ctx.node_config["partition-id"] == 1:
            return Message(Error(code=1, reason="connection lost"), reply_to=msg)
        return reply

    run = run_with(make_config(tmp_path / "run", cohorts={"finance": {"sites": 5}}, train__rounds=1, secure_aggregation=SECAGG), drop)
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])["cohorts"]["finance"]
    assert line["sites_trained"] == 4 and line["sites_failed"] == ["finance-2"]


def test_a_cohort_below_min_sites_aggregates_in_the_clear_and_says_so(make_config, tmp_path: Path, caplog) -> None:
    run, summary = simulate(make_config(tmp_path / "run", train__rounds=1, secure_aggregation=SECAGG), progress=False)
    assert summary["cohorts"]["finance"]["secure_aggregation"] is False
    assert "fewer than secure_aggregation.min_sites = 3" in caplog.text
