"""Secure aggregation between real processes, and Flower's convention `flwr run .`: a Flower
SuperLink and three `fedlora client` sites (SuperNodes) on loopback, the run submitted with
`flwr run <the repository>` (its pyproject's [tool.flwr.app]) and `--run-config`; the coordinator (fedlora's ServerApp in its own
process) gets only the cohort's sums, the sites' protocol state lives in their SuperNodes'
contexts across messages, and the run directory is what `fedlora simulate` writes.

The same federation then loses a site in the middle of a secure round (SIGTERM to the site's
process only, as systemd or Kubernetes stop a service, once it holds a masked update): the site
stops its SuperNode and exits 0, nothing of it left running, and that round completes with the
other two. The site is started again (a new node id: no SuperNode authentication here) and
trains again in the next round under its name. Meanwhile another site is paused (SIGSTOP to its
agent between two messages; its SuperNode stays connected), so that the coordinator waits in
that round for it until the restarted site is back: nothing depends on how fast a busy machine
restarts a site.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import tomli_w

from deployment import LocalDeployment, live_processes, wait_for
from fedlora.simulation import demo_data

REPO = Path(__file__).resolve().parents[1]  # `flwr run .` from the repository root


def _idle(log: Path) -> bool:
    """The SuperNode log shows a reply sent for every message received: its worker is between messages."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    return text.count("Receiving: ") == text.count("Sent successfully")


def _reached(log: Path, round_: int, stage: str) -> bool:
    """The SuperNode log shows ``stage``'s message of round ``round_`` (Flower logs ``[RUN r, ROUND n]``
    before each message it receives or sends; the coordinator's group id is the round)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    at = text.find(f"ROUND {round_}]")
    return at >= 0 and f"Receiving: {stage} message" in text[at:]


def test_secure_aggregation_between_superlink_and_supernode_processes_and_a_site_stopped_mid_round_and_restarted(
        tiny_model: Path, tmp_path: Path) -> None:
    files = demo_data.write_cohort(tmp_path / "data", "finance", 3, seed=0, examples_per_site=40, size_skew=0.5, label_skew=1.0)
    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps({
        "seed": 7, "model": {"source": str(tiny_model), "max_length": 32},
        "lora": {"rank": 4, "alpha": 8.0, "mode": "standard"},  # the tests' regime (tests/conftest.py's tiny_config)
        "train": {"rounds": 2, "local_steps": 2, "local_epochs": 0.0, "batch_size": 8, "optimizer": "adamw", "learning_rate": 0.01},
        "cohorts": {"finance": {"sites": 3}},
        "privacy": {"dp": False},  # the secure sums of the eval metrics are checked: DP (on by default) keeps them at the sites
        "secure_aggregation": {"stage_timeout": 600.0},  # how long the coordinator waits for the paused site
    }))
    out = tmp_path / "run"
    with LocalDeployment(tmp_path / "deploy") as d:
        for i, f in enumerate(files, start=1):
            d.site(f"finance-{i}", "finance", f, tmp_path / "state" / f"finance-{i}")
        d.submit(REPO, run_config={"config": str(config), "out": str(out), "min-sites": 3, "wait-timeout": 120.0})
        state = tmp_path / "state"
        # round 1's train message reached the victim and its keys went back: now it holds a masked update
        wait_for(lambda: _reached(state / "finance-3" / "supernode.log", 1, "train.secagg_share") or d.procs["flwr-run"].poll()
                 is not None, 600, "finance-3 to reach stage 2 of round 1")
        wait_for(lambda: _idle(state / "finance-1" / "supernode.log"), 60, "finance-1 between two messages")
        d.pause("finance-1")  # round 1 cannot end before finance-1 answers again
        d.signal("finance-3", signal.SIGTERM)
        assert d.wait("finance-3", 120) == 0, d.log("finance-3")[-4000:]  # stopped cleanly, mid-round
        assert d.leftovers_of("finance-3") == []  # its SuperNode went with it
        d.site("finance-3", "finance", files[2], state / "finance-3", label="finance-3-restarted")
        wait_for(lambda: "finance-3 connected" in d.log("finance-3-restarted"), 300, "the restarted finance-3 to connect")
        d.resume("finance-1")
        assert d.wait("flwr-run", 900) == 0, d.log("flwr-run")[-6000:]
    assert live_processes(d.tree) == []  # SuperLink, SuperNodes and every process they started are gone
    stopped = d.log("finance-3")
    assert "fedlora client: site finance-3 stopped" in stopped and "terminate called" not in stopped
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cohorts"]["finance"]["secure_aggregation"] is True
    assert summary["cohorts"]["finance"]["sites"] == ["finance-1", "finance-2", "finance-3"]
    assert summary["sites"] == 3 and summary["cohorts"]["finance"]["sites_trained"] == ["finance-1", "finance-2", "finance-3"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["cohorts"]["finance"]["eval_sites"] == 3
    assert (out / "adapters" / "finance" / "adapter_model.safetensors").is_file()
    # round 1: finance-3 stopped holding a masked update; the others' shares recover the sum of the two
    line = lines[1]["cohorts"]["finance"]
    assert line["sites_failed"] == ["finance-3"] and line["sites_trained"] == 2, line
    assert "secure_aggregation_aborted" not in line
    # round 2: the restarted finance-3 took its place again
    line = lines[2]["cohorts"]["finance"]
    assert line["sites_trained"] == 3 and line["values_clipped"] == 0 and line["sites_failed"] == [], line
    assert line["eval_sites"] == 3 and line["site_eval_seconds"] is None  # metrics summed securely too
    assert "site finance-3 rejoined" in d.log("flwr-run")
    assert "trained 2 steps" in d.log("finance-3-restarted")
    assert summary["rounds_completed"] == 2


def test_a_site_restarted_under_a_new_node_id_takes_its_old_place_and_no_one_else_joins(make_config, tmp_path: Path, monkeypatch,
                                                                                         caplog) -> None:
    """The coordinator's side of a restart without SuperNode authentication (Flower gives the
    restarted SuperNode a new node id): at the next round every node not seen before is asked who
    it is, once; a site of the run whose old node is offline takes its place, nobody else joins."""
    import logging

    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.protocol import SiteInfo, record_of
    from fedlora.server.coordinator import Coordinator

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)

    class Grid:
        def __init__(self, online: dict[int, tuple[str, str]]) -> None:
            self.online, self.asked = online, []  # node -> (the name and cohort it says)

        def get_node_ids(self) -> list[int]:
            return sorted(self.online)

        def send_and_receive(self, messages, *, timeout=None):
            self.asked += [m.metadata.dst_node_id for m in messages]
            assert all(m.metadata.message_type == "query" for m in messages)
            return [Message(RecordDict({SiteInfo.record: record_of(SiteInfo(*self.online[m.metadata.dst_node_id]))}), reply_to=m)
                    for m in messages]

    cfg = make_config(tmp_path / "run", cohorts={"finance": {"sites": 3}})
    co = Coordinator(cfg, None, {"finance": ["negative", "neutral", "positive"]}, expected_sites=3, progress=False)
    co.cohorts["finance"].nodes = {11: "finance-1", 12: "finance-2", 13: "finance-3"}
    co.seen = {11, 12, 13}
    grid = Grid({11: ("finance-1", "finance"), 12: ("finance-2", "finance"),  # 13 is gone:
                 23: ("finance-3", "finance"),  # finance-3, restarted
                 24: ("finance-1", "finance"),  # a second finance-1, while the first is online
                 25: ("finance-7", "finance"), 26: ("retail-1", "retail")})  # sites the run did not start with
    with caplog.at_level(logging.INFO, logger="fedlora.server"):
        co._rejoin(grid, 2)
        co._rejoin(grid, 3)  # each node is asked once
    assert grid.asked == [23, 24, 25, 26]
    assert co.cohorts["finance"].nodes == {11: "finance-1", 12: "finance-2", 23: "finance-3"}
    assert list(co.cohorts["finance"].nodes.values()) == ["finance-1", "finance-2", "finance-3"]
    text = caplog.text
    assert "site finance-3 rejoined (restarted: node 23, before 13)" in text
    assert "node 24 calls itself finance-1, a name a connected site holds; refused" in text
    assert "site finance-7 (cohort 'finance') connected after the run started" in text
    assert "site retail-1 (cohort 'retail') connected after the run started" in text
