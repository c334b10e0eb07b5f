"""The coordinator under bad replies: a NaN update is rejected, a dead cohort stops the run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, Error, Message

from conftest import run_with as _run_with
from fedlora.errors import FederationError


def test_a_nan_update_is_rejected_and_the_rest_aggregate(make_config, tmp_path: Path) -> None:
    def poison(msg, ctx, reply):
        if msg.metadata.message_type == "train" and ctx.node_config["partition-id"] == 0:  # finance-1
            record = reply.content["update"]
            key = next(iter(record))
            a = record[key]
            record[key] = Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype,
                                data=np.full(a.shape, np.nan, dtype="<f4").tobytes())
        return reply

    run = _run_with(make_config(tmp_path / "run"), poison)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()[1:]]
    assert all(x["cohorts"]["finance"]["sites_failed"] == ["finance-1"] for x in lines)
    assert all(x["cohorts"]["finance"]["sites_trained"] == 1 and x["cohorts"]["medical"]["sites_trained"] == 2 for x in lines)
    from safetensors.numpy import load_file

    weights = load_file(str(run / "adapters" / "finance" / "adapter_model.safetensors"))
    assert all(np.all(np.isfinite(v)) for v in weights.values())


def test_a_cohort_whose_every_site_fails_stops_the_run(make_config, tmp_path: Path) -> None:
    def refuse(msg, ctx, reply):
        if msg.metadata.message_type == "train" and ctx.node_config["partition-id"] in (2, 3):  # medical-1, medical-2
            return Message(Error(code=1, reason="disk full"), reply_to=msg)
        return reply

    with pytest.raises(FederationError, match=r"round 1: every site of cohort 'medical' failed \(medical-1, medical-2\)"):
        _run_with(make_config(tmp_path / "run"), refuse)
    assert not (tmp_path / "run" / "summary.json").exists(), "no summary for a run that did not complete"


def test_a_site_whose_evaluation_fails_is_named_in_the_metrics(make_config, tmp_path: Path) -> None:
    """An error reply to ``evaluate`` (or none at all) is named in ``eval_sites_failed`` with its
    reason; the other sites' metrics still combine."""
    def refuse(msg, ctx, reply):
        if msg.metadata.message_type == "evaluate" and ctx.node_config["partition-id"] == 0:  # finance-1
            return Message(Error(code=1, reason="out of memory"), reply_to=msg)
        return reply

    run = _run_with(make_config(tmp_path / "run", train__rounds=1), refuse)
    for x in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()):
        entry = x["cohorts"]["finance"]
        assert entry["eval_sites_failed"] == ["finance-1"], entry
        assert "out of memory" in entry["eval_sites_failed_reasons"]["finance-1"]
        assert entry["accuracy"] is not None and "eval_sites_failed" not in x["cohorts"]["medical"]
