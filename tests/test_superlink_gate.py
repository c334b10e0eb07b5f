"""fedlora's gate in front of Flower's SuperLink (fedlora.server.superlink_gate): on the public
socket only the Fleet API (the sites' SuperNodes) and /health; on the loopback socket everything,
with exactly one StartRun: fedlora server's own FAB. The middleware is called as ASGI with fake
scopes; one short test starts the gate process itself (insecure, loopback, no federation). The
start-up checks of fedlora server (sites against keys, a run directory one server at a time, a
failed start's folder cleared for a retry) are tested on plan_server and its helpers.

(The stranger's `flwr run` against a real federation is in tests/test_deploy.py.)
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.errors import ConfigError, DeploymentError
from fedlora.server.superlink_gate import START_RUN, StartRunPolicy, SuperLinkGate, fleet_paths, read_ready

PRIVATE, PUBLIC = 40123, 9092


class Inner:
    """The SuperLink's app, as the gate sees it: records what reached it, answers 200."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            self.calls.append((scope["type"], b""))
            return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        self.calls.append((scope["path"], body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(gate: SuperLinkGate, path: str, *, server: tuple[str, int] | None = ("127.0.0.1", PUBLIC), method: str = "POST",
         body: bytes = b"", kind: str = "http", chunk: int = 0) -> tuple[int, dict]:
    """One request through the gate; (status, JSON body or {})."""
    scope = {"type": kind, "path": path, "method": method, "server": server, "client": ("203.0.113.7", 5555), "headers": []}
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    asyncio.run(gate(scope, receive, send))
    if kind == "websocket":
        return (1008 if sent and sent[0]["type"] == "websocket.close" else 0), {}
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    raw = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, (json.loads(raw) if status != 200 else {})


def fab_request(content: bytes, *, overrides: bool = False, hash_str: str | None = None, app_spec: str = "") -> bytes:
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.proto.fab_pb2 import Fab

    req = StartRunRequest(fab=Fab(hash_str=hashlib.sha256(content).hexdigest() if hash_str is None else hash_str, content=content),
                          app_spec=app_spec)
    if overrides:
        req.override_config["run-dir"].string = "/tmp/elsewhere"
    return req.SerializeToString()


def test_the_public_socket_serves_the_fleet_api_and_health_only() -> None:
    inner = Inner()
    gate = SuperLinkGate(inner, private_port=PRIVATE)
    for path in sorted(fleet_paths()) + ["/health"]:
        assert call(gate, path, method="GET" if path == "/health" else "POST")[0] == 200, path
    refused = [START_RUN, "/v1/control/register-node", "/v1/control/list-runs", "/v1/control/stop-run", "/v1/runtime/get-nodes",
               "/v1/runtime/push-messages", "/v1/runtime/create-task", "/docs", "/openapi.json", "/", "/v1/fleet",
               "/v1/fleet/../control/start-run", "/v1/fleet/pull-messages/", "/v1/fleet/pull-messages/../../control/start-run"]
    before = len(inner.calls)
    for path in refused:
        status, doc = call(gate, path, body=fab_request(b"x"))
        assert status == 403 and "serves only the Fleet API" in doc["detail"], path
    # the loopback port on another address, a socket fedlora did not name, no socket at all: public (fail closed)
    for server in [("10.0.0.5", PRIVATE), ("::ffff:127.0.0.1", PUBLIC), None]:
        assert call(gate, "/v1/control/list-runs", server=server)[0] == 403
    assert call(gate, "/v1/fleet/pull-messages", kind="websocket")[0] == 1008
    assert len(inner.calls) == before  # nothing refused reached Flower's app
    assert gate.refused == len(refused) + 4
    # on the loopback socket Flower's app sees everything (the coordinator's flwr CLI, SuperExec, the ServerApp)
    for path in ["/v1/control/register-node", "/v1/control/list-runs", "/v1/runtime/get-nodes", "/v1/fleet/pull-messages", "/docs"]:
        assert call(gate, path, server=("127.0.0.1", PRIVATE))[0] == 200
    assert call(gate, "/v1/control/list-runs", server=("::1", PRIVATE))[0] == 200
    asyncio.run(gate({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert inner.calls[-1] == ("lifespan", b"")


def test_every_path_a_supernode_calls_is_public() -> None:
    """The SuperNode's Fleet HTTP client's paths (Flower 1.41's source) all pass the public socket."""
    from flwr.supernode.fleet_http_client import FleetHttpClient

    used = set(re.findall(r'path="(/[^"]+)"', inspect.getsource(FleetHttpClient)))
    assert len(used) >= 10 and used <= fleet_paths()
    assert all(p.startswith("/v1/fleet/") for p in fleet_paths())


def test_the_loopback_socket_starts_exactly_one_run_fedloras_own_fab() -> None:
    inner = Inner()
    own, other = b"fedlora's FAB", b"a stranger's FAB"
    gate = SuperLinkGate(inner, private_port=PRIVATE, policy=StartRunPolicy())
    private = ("127.0.0.1", PRIVATE)
    status, doc = call(gate, START_RUN, server=private, body=fab_request(own))
    assert status == 403 and "has not submitted its run yet" in doc["detail"]  # unarmed: no StartRun at all
    gate.policy.fab_sha256 = hashlib.sha256(own).hexdigest()
    for body, why in [(fab_request(other), "not the FAB fedlora server built"),
                      (fab_request(own, hash_str=hashlib.sha256(other).hexdigest()), "not the FAB"),
                      (fab_request(other, hash_str=hashlib.sha256(own).hexdigest()), "not the FAB"),
                      (fab_request(b"", app_spec="@stranger/app"), "not the FAB"),
                      (fab_request(own, app_spec="@stranger/app"), "not the FAB"),
                      (fab_request(own, overrides=True), "no --run-config overrides"),
                      (b"\xff\xff\xff", "not a StartRun request")]:
        status, doc = call(gate, START_RUN, server=private, body=body)
        assert status == 403 and why in doc["detail"]
    assert inner.calls == []
    body = fab_request(own)
    assert call(gate, START_RUN, server=private, body=body, chunk=5)[0] == 200
    assert inner.calls == [(START_RUN, body)]  # Flower's app got the whole body, as sent
    status, doc = call(gate, START_RUN, server=private, body=body)
    assert status == 403 and "starts no other" in doc["detail"]
    assert len(inner.calls) == 1


def test_the_ready_file_names_a_sha256(tmp_path: Path) -> None:
    good = tmp_path / "ready.json"
    good.write_text(json.dumps({"fab_sha256": "ab" * 32}))
    assert read_ready(good) == "ab" * 32
    for doc in [{}, {"fab_sha256": "AB" * 32}, {"fab_sha256": "ab" * 31}, ["ab" * 32]]:
        good.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match="fab_sha256"):
            read_ready(good)


def test_the_fab_hash_fedlora_server_arms_is_what_flwr_run_sends(tmp_path: Path) -> None:
    """``flwr run APP`` migrates the app's pyproject.toml, then builds its FAB: the same bytes as
    ``Deployment.open_to_sites`` hashes beforehand."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_migration import migrate

    from fedlora.server.deploy import flower_app_toml

    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(flower_app_toml({"run-dir": str(tmp_path / "run"), "resume": False, "min-sites": 3,
                                                         "wait-timeout": 60.0, "registered": "a=1,b=2", "config": "", "out": "",
                                                         "ca-pem": ""}))
    armed = hashlib.sha256(build_fab_from_disk(app)).hexdigest()
    migrate(str(app), [], ignore_legacy_usage=True)
    assert hashlib.sha256(build_fab_from_disk(app)).hexdigest() == armed


def test_the_gate_process_opens_its_public_port_only_when_ready(tmp_path: Path) -> None:
    import socket

    import httpx

    from deployment import ProcessTree, live_processes, wait_for
    from fedlora.files import write_text_atomic
    from fedlora.processes import flower_env, free_port, wait_for_port

    private, public = free_port(), free_port()
    home = tmp_path / "home"
    home.mkdir()
    ready = home / "gate-ready.json"
    tree = ProcessTree()
    try:
        with (tmp_path / "gate.log").open("w") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "fedlora.server.superlink_gate", "--public", f"127.0.0.1:{public}",
                                     "--ready-file", str(ready), "--", "--insecure", "--host", "127.0.0.1", "--port", str(private),
                                     "--disable-runtime-dependency-installation"], stdout=logf, stderr=subprocess.STDOUT,
                                    env=flower_env(home), cwd=home, start_new_session=True)
        tree.add(proc)
        log = lambda: (tmp_path / "gate.log").read_text(errors="replace")  # noqa: E731
        wait_for_port("127.0.0.1", private, 60, proc, log)
        with socket.socket() as s:  # bound, not listening: a site's connection is refused (its SuperNode retries)
            assert s.connect_ex(("127.0.0.1", public)) != 0
        with httpx.Client(base_url=f"http://127.0.0.1:{private}", timeout=30) as c:
            assert c.get("/health").status_code == 200
        write_text_atomic(ready, json.dumps({"fab_sha256": "00" * 32}))
        wait_for_port("127.0.0.1", public, 30, proc, log)
        with httpx.Client(base_url=f"http://127.0.0.1:{public}", timeout=30) as c:
            assert c.get("/health").status_code == 200
            r = c.post("/v1/control/list-runs", content=b"", headers={"content-type": "application/protobuf"})
            assert r.status_code == 403 and "serves only the Fleet API" in r.json()["detail"]
        with httpx.Client(base_url=f"http://127.0.0.1:{private}", timeout=30) as c:  # the same request on loopback: Flower answers
            assert c.post("/v1/control/list-runs", content=b"", headers={"content-type": "application/protobuf"}).status_code == 200
        wait_for(lambda: "refused POST /v1/control/list-runs" in log(), 10, "the refusal in the gate's log")
        proc.terminate()
        proc.wait(60)
        assert "Fleet API (the sites) open on 127.0.0.1" in log()
    finally:
        tree.shutdown()
    assert live_processes(tree) == []  # SuperExec went with it


def test_plan_server_checks_sites_against_keys_before_making_anything(make_config, tmp_path: Path) -> None:
    from fedlora.server.certs import make_certs
    from fedlora.server.deploy import plan_server

    certs = make_certs(tmp_path / "certs", ["localhost"], ["finance-1"]).out
    cfg = make_config(tmp_path / "run")
    assert cfg.total_sites > 1
    kw = dict(resume=None, address="127.0.0.1:9", certs=str(certs), insecure=False, wait_timeout=5.0)
    with pytest.raises(ConfigError, match=r"more sites than the 1 site key\(s\).*finance-1"):
        plan_server(cfg, min_sites=None, **kw)
    with pytest.raises(ConfigError, match="--min-sites"):
        plan_server(cfg, min_sites=2, **kw)
    assert not (tmp_path / "run").exists()
    plan = plan_server(cfg, min_sites=1, **kw)
    assert plan.min_sites == 1 and (tmp_path / "run" / "config.toml").is_file()


def test_a_failed_start_does_not_block_the_retry_and_a_live_run_is_never_cleared(make_config, tmp_path: Path) -> None:
    from fedlora.server.deploy import failed_start, plan_server, run_dir_lock

    run = tmp_path / "run"
    cfg = make_config(run)
    kw = dict(resume=None, address="127.0.0.1:9", certs=None, insecure=True, min_sites=None, wait_timeout=5.0)
    plan_server(cfg, **kw)
    # what a start that failed before its first round leaves: config, logs, error.json, round 0's metrics, a stale .flower
    (run / "logs").mkdir()
    (run / "logs" / "run.log").write_text("the first attempt\n")
    (run / "error.json").write_text(json.dumps({"error": "not enough sites within 5 s", "exit_code": 6}))
    (run / "metrics.jsonl").write_text("{}\n")
    (run / ".flower" / "app").mkdir(parents=True)
    assert failed_start(run)
    with run_dir_lock(run):  # a live fedlora server holds it: never cleared
        with pytest.raises(DeploymentError, match="in use by another fedlora server"):
            plan_server(cfg, **kw)
        with pytest.raises(DeploymentError, match="in use"):
            with run_dir_lock(run):
                pass
    assert (run / "error.json").is_file()
    plan = plan_server(cfg, **kw)  # the retry
    assert plan.run_dir.path == run
    assert sorted(p.name for p in run.iterdir()) == ["config.toml", "logs"]
    assert (run / "logs" / "run.log").read_text() == "the first attempt\n"  # the failed start's logs are kept
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # a run that completed a round, or a folder holding anything else, is not a failed start: RunDir refuses it
    (run / "checkpoint").mkdir()
    assert not failed_start(run)
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        plan_server(cfg, **kw)
    (run / "checkpoint").rmdir()
    (run / "notes.txt").write_text("mine")
    assert not failed_start(run) and not failed_start(tmp_path / "absent")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        plan_server(cfg, **kw)
