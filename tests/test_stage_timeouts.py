"""Rounds that do not wait: time limits per message kind and short polling.

* ``fedlora.server.exchange``: a site that has not answered a ``train``, ``evaluate`` or
  ``query`` message within ``federation.<kind>_timeout`` (a secure-aggregation stage: within
  ``secure_aggregation.stage_timeout``) gets a stand-in error reply ``timed out after N s
  (key)``; the SuperLink is polled every 50 ms at first, not every 3 s (a fake clock: no timing here);
* in a real in-process federation, sites too slow at the handshake, at training and at a
  secure-aggregation stage are left out and named with that reason, and the run completes;
* ``fedlora.client.supernode_main``: Flower's SuperNode with its 3 s idle pull and 0.5 s reply
  checks shortened, in that module only (the installed Flower still sleeps there that way).
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from conftest import run_with
from fedlora.client import supernode_main
from fedlora.config import ConfigError, FederationConfig, config_from_dict
from fedlora.server import exchange
from fedlora.server.exchange import TIMED_OUT_CODE, TimedGrid, send_and_receive, with_timeouts


class FakeClock:
    """``time`` for ``fedlora.server.exchange``: ``sleep`` advances ``monotonic`` and is recorded."""

    def __init__(self) -> None:
        self.now, self.sleeps = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeSuperLink(HttpGrid):
    """The Deployment Engine's grid without a SuperLink: node ``n`` answers on the
    ``answer_after[n]``-th pull after the push (never if absent)."""

    def __init__(self, answer_after: dict[int, int]) -> None:  # no Runtime API connection
        self.answer_after, self.pulls, self.sent = answer_after, 0, {}

    def get_node_ids(self):
        return list(self.answer_after)

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{len(self.sent) + i}"
            ids.append(m.metadata.message_id)
        self.sent.update({m.metadata.message_id: m for m in messages})
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for i in message_ids:
            m = self.sent[i]
            if self.answer_after.get(m.metadata.dst_node_id, 10**9) <= self.pulls:
                out.append(Message(RecordDict(), reply_to=m))
        return out


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    import flwr.superlink.grid.http_grid as http_grid

    c = FakeClock()
    monkeypatch.setattr(exchange, "time", c)
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # prompt_reply_pulls rebinds it: restored after
    # messages take their sender from the process-wide task identity (the ServerApp's, on a SuperLink)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    return c


def _messages(kind: str, nodes: list[int]) -> list[Message]:
    return [Message(RecordDict(), n, kind, group_id="1") for n in nodes]


def test_a_site_silent_past_its_kinds_limit_gets_a_timed_out_reply_and_the_superlink_is_polled_every_tenth_second(clock) -> None:
    link = FakeSuperLink({1: 3})  # node 1 answers at the third pull; node 2 never
    grid = with_timeouts(link, FederationConfig(train_timeout=5.0), {2: "bank-b"})
    replies = {r.metadata.src_node_id: r for r in send_and_receive(grid, _messages("train", [1, 2]), timeout=None)}
    assert not replies[1].has_error()
    assert replies[2].has_error() and replies[2].error.code == TIMED_OUT_CODE
    assert replies[2].error.reason == "timed out after 5 s (federation.train_timeout)"
    assert replies[2].metadata.reply_to_message_id == link.sent["m1"].metadata.message_id
    # Flower's own send_and_receive sleeps 3 s between pulls; here 50 ms at first, then 1/20 of the time waited, at most 0.5 s
    assert clock.sleeps[0] == 0.05 and max(clock.sleeps) <= 0.5 and clock.sleeps == sorted(clock.sleeps)
    waited = 0.0
    for s in clock.sleeps:
        assert s <= max(0.05, waited / 20) + 1e-9
        waited += s
    assert clock.now - 1000.0 == pytest.approx(5.0)  # waited out the limit, no longer


def test_each_kind_has_its_own_limit_and_a_callers_timeout_names_the_stage(clock) -> None:
    cfg = FederationConfig(train_timeout=50.0, evaluate_timeout=7.0, query_timeout=2.0)
    for kind, seconds, key in (("evaluate", 7.0, "federation.evaluate_timeout"), ("query", 2.0, "federation.query_timeout")):
        start = clock.now
        (reply,) = send_and_receive(with_timeouts(FakeSuperLink({}), cfg), _messages(kind, [3]), timeout=None)
        assert reply.error.reason == f"timed out after {seconds:g} s ({key})"
        assert clock.now - start == pytest.approx(seconds)
    (reply,) = send_and_receive(with_timeouts(FakeSuperLink({}), cfg), _messages("query.extra", [3]), timeout=None)
    assert reply.error.reason == "timed out after 2 s (federation.query_timeout)"  # a kind's own action: the kind's limit
    # a secure-aggregation stage: the coordinator passes secure_aggregation.stage_timeout itself, which wins
    (reply,) = send_and_receive(with_timeouts(FakeSuperLink({}), cfg), _messages("train.secagg_masked", [3]), timeout=1.5)
    assert reply.error.reason == "timed out after 1.5 s (secure_aggregation.stage_timeout)"


def test_without_a_limit_every_reply_is_waited_for(clock) -> None:
    link = FakeSuperLink({1: 400, 2: 1})  # 40 s of polling for node 1
    replies = send_and_receive(link, _messages("train", [1, 2]), timeout=None)  # a bare grid: no limits
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2] and not any(r.has_error() for r in replies)
    unknown = TimedGrid(FakeSuperLink({1: 2}), {"train": (5.0, "federation.train_timeout")})
    (reply,) = send_and_receive(unknown, _messages("query", [1]), timeout=None)  # a kind without a limit
    assert not reply.has_error()


def test_another_grid_keeps_its_own_send_and_receive_and_gets_stand_ins_too(clock) -> None:
    calls = []

    class Ray(Grid):  # another engine's grid (not an HttpGrid, not the in-process one): its own send_and_receive
        run = None

        def set_run(self, run):
            pass

        def create_message(self, *args, **kwargs):
            raise NotImplementedError

        def get_node_ids(self):
            return [1, 2]

        def push_messages(self, messages):
            raise NotImplementedError

        def pull_messages(self, message_ids):
            raise NotImplementedError

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            calls.append(timeout)
            for i, m in enumerate(messages):
                m.metadata.__dict__["_message_id"] = f"r{i}"
            return [Message(RecordDict(), reply_to=messages[0])]

    got = send_and_receive(with_timeouts(Ray(), FederationConfig(evaluate_timeout=9.0)), _messages("evaluate", [1, 2]), timeout=None)
    assert calls == [9.0]
    assert [(r.metadata.src_node_id, r.has_error()) for r in got] == [(1, False), (2, True)]


def test_timeouts_are_validated() -> None:
    for bad in (0, -1.0, float("inf"), True, "60"):
        with pytest.raises(ConfigError, match="federation.train_timeout"):
            FederationConfig(train_timeout=bad)
    cfg = config_from_dict({"federation": {"query_timeout": 30, "evaluate_timeout": 120.5}})
    assert (cfg.federation.query_timeout, cfg.federation.evaluate_timeout, cfg.federation.train_timeout) == (30, 120.5, 3600.0)


def test_slow_sites_at_the_handshake_at_training_and_at_a_secure_stage_are_left_out_and_named(make_config, tmp_path: Path) -> None:
    """finance (5 sites, secure, t = 4) and medical (3 sites, in the clear: min_sites 4 with
    allow_clear): medical-3 answers the handshake late (it does not join), medical-1 its train
    message, finance-2 its masked vector (a dropout the others' shares recover)."""
    from fedlora.model import ModelSpec, get_runtime

    limit = 3.0
    slow = {("query", 7): "medical-3", ("train", 5): "medical-1", ("train.secagg_masked", 1): "finance-2"}  # partition ids

    def late(msg, ctx, reply):
        if (msg.metadata.message_type, ctx.node_config["partition-id"]) in slow:
            time.sleep(limit + 2.0)
        return reply

    cfg = make_config(tmp_path / "run", cohorts={"finance": {"sites": 5}, "medical": {"sites": 3}}, train__rounds=1,
                      federation={"train_timeout": limit, "query_timeout": limit},
                      secure_aggregation={"enabled": True, "min_sites": 4, "allow_clear": True, "stage_timeout": limit})
    get_runtime(ModelSpec.from_config(cfg), "cpu")  # the model loaded before the clock runs, as `fedlora simulate` does
    run = run_with(cfg, late)
    assert json.loads((run / "sites.json").read_text())["medical"] == ["medical-1", "medical-2"]  # medical-3 never joined
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])["cohorts"]
    why = f"timed out after {limit:g} s"
    assert line["medical"]["sites_failed"] == ["medical-1"] and line["medical"]["sites_trained"] == 1
    assert line["medical"]["sites_failed_reasons"]["medical-1"].endswith(f"{why} (federation.train_timeout)")
    assert line["finance"]["sites_failed"] == ["finance-2"] and line["finance"]["sites_trained"] == 4
    assert line["finance"]["sites_failed_reasons"]["finance-2"].endswith(f"{why} (secure_aggregation.stage_timeout)")
    assert "secure_aggregation_aborted" not in line["finance"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["cohorts"]["finance"]["secure_aggregation"] is True


def test_the_supernode_sleeps_briefly_where_flower_sleeps_3_s(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as sci

    source = inspect.getsource(sci)
    assert "time.sleep(3)" in inspect.getsource(sci.start_client_internal), "Flower's idle pull moved: recheck supernode_main"
    assert source.count("time.sleep(0.5)") == 2 and source.count("time.sleep(") == 3  # the reply checks; nothing else sleeps there
    loop = inspect.getsource(sci.start_client_internal)
    assert "run_id = _pull_and_store_message(" in loop and "_push_messages(" in loop  # the steps marked as activity
    for name in ("time", "_pull_and_store_message", "_push_messages"):
        monkeypatch.setattr(sci, name, getattr(sci, name))  # restored after the test
    assert supernode_main.shorten_idle_waits() and supernode_main.shorten_idle_waits()  # idempotent
    assert sci.time is not time and sci.time.monotonic is time.monotonic  # only sleep differs
    assert time.sleep is not sci.time.sleep  # the process's time module is untouched
    assert sci._pull_and_store_message._fedlora_marked and sci._push_messages._fedlora_marked


def test_the_idle_pull_wait_starts_at_50_ms_after_a_message_and_grows_to_half_a_second() -> None:
    now = [0.0]
    pacer = supernode_main._Pacer(clock=lambda: now[0])
    site = types.ModuleType("start_client_internal")  # Flower's module, reduced to what is patched
    got = iter([None, None, 7])  # two empty pulls, then a message of run 7
    site.time, site._pull_and_store_message, site._push_messages = time, lambda **kw: next(got), lambda **kw: None
    assert supernode_main.shorten_idle_waits(site, pacer)

    waits = []
    for t in (0.0, 0.5, 2.0, 4.0, 10.0, 60.0):
        now[0] = t
        waits.append(pacer.wait())
    assert waits == [0.05, 0.05, 0.1, 0.2, 0.5, 0.5]  # at most 5 % of the idle time, at most 0.5 s (Flower: always 3 s)
    assert site._pull_and_store_message() is None and pacer.wait() == 0.5  # a pull that found nothing is no activity
    site._pull_and_store_message()
    assert site._pull_and_store_message() == 7 and pacer.wait() == 0.05  # a message came: fast again
    now[0] = 100.0
    site._push_messages()
    assert pacer.wait() == 0.05  # a reply went: the next stage comes soon

    slept = []
    real = types.SimpleNamespace(__name__="time", __doc__="", sleep=slept.append, time=lambda: 42.0)
    paced = supernode_main._Paced(real, {3: pacer.wait, 0.5: supernode_main.REPLY_INTERVAL})
    for s in (3, 0.5, 1, 0.25):
        paced.sleep(s)
    assert slept == [0.05, supernode_main.REPLY_INTERVAL, 1, 0.25] and paced.time() == 42.0  # other sleeps and functions: real
    assert supernode_main.REPLY_INTERVAL <= 0.1


def test_objects_not_there_yet_are_asked_for_again_within_100_ms_on_each_side(monkeypatch: pytest.MonkeyPatch, clock) -> None:
    """Flower retries an object that is listed but not yet pushed after 1 s, doubling: the
    SuperNode's pulls from the SuperLink, the ClientApp worker's from the SuperNode and the
    ServerApp's replies from the SuperLink retry after 50 ms, then every 100 ms, within Flower's 2 h."""
    import flwr.superlink.grid.http_grid as http_grid
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal as sci
    from flwr.supernode.runtime import run_clientapp

    for module, name in ((sci, "pull_objects"), (run_clientapp, "pull_and_inflate_object_from_tree")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
        assert {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= set(inspect.signature(getattr(module, name)).parameters)
        assert supernode_main.prompt_object_pulls(module) == [name] and supernode_main.prompt_object_pulls(module) == []
        assert getattr(module, name).keywords == {"initial_backoff": 0.05, "backoff_cap": 0.1, "max_tries_per_object": None}
    send_and_receive(FakeSuperLink({1: 1}), _messages("train", [1]), timeout=None)  # the ServerApp's side, once it polls
    assert http_grid.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.1, "max_tries_per_object": None}

    # Flower's pulls: the first retry waits initial_backoff, and the tree pull hands it down to pull_objects
    pull = inspect.getsource(inflatable_utils.pull_objects)
    assert "delay = initial_backoff" in pull and "delay = min(delay * 2, backoff_cap)" in pull
    assert "if max_tries_per_object is None:" in pull and "time.monotonic() - start >= max_time" in pull  # no try limit, a time limit
    assert "initial_backoff=initial_backoff" in inspect.getsource(inflatable_utils.pull_and_inflate_object_from_tree)


def test_a_flower_that_sleeps_otherwise_runs_unpatched_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    other = types.ModuleType("flwr.supernode.start_client_internal")
    other.time = types.SimpleNamespace(sleep=lambda s: None)
    assert not supernode_main.shorten_idle_waits(other)
    assert "keeps Flower's 3 s idle pull interval" in capsys.readouterr().err


def test_the_launcher_is_flowers_supernode_command() -> None:
    out = subprocess.run([sys.executable, "-m", "fedlora.client.supernode_main", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: flower-supernode") and "--superlink" in out.stdout and "--isolation" in out.stdout
