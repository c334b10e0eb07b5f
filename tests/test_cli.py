"""The `fedlora` command as a user runs it: exit codes, messages, nothing written on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

FEDLORA = [sys.executable, "-m", "fedlora.cli"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*FEDLORA, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_label_outside_the_cohort_list_exits_3_names_the_row_and_writes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "fin.csv"
    bad.write_text("text,label\nshares up,positive\nshares down,terrible\nflat,neutral\n")
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\nsource = "{tiny_model}"\n[cohorts.finance]\nsites = 1\ndata = "{bad}"\n'
                   'labels = ["negative", "neutral", "positive"]\n')
    out = tmp_path / "run"
    p = _run("simulate", "--config", str(cfg), "--out", str(out), cwd=tmp_path)
    assert p.returncode == 3, p.stderr
    assert "fin.csv: row 2, column 'label': label 'terrible' is not in the cohort's labels [negative, neutral, positive]" in p.stderr
    assert not out.exists()


def test_missing_column_and_bad_config_value(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("body,label\nshares up,positive\nshares down,negative\n")
    p = _run("simulate", "--model", str(tiny_model), "--data", f"finance={data}", "--out", str(tmp_path / "r1"), cwd=tmp_path)
    assert p.returncode == 3 and "no text column 'text'; columns present: body, label" in p.stderr
    p = _run("simulate", "--model", str(tiny_model), "--rounds", "0", "--out", str(tmp_path / "r2"), cwd=tmp_path)
    assert p.returncode == 2 and "train.rounds = 0" in p.stderr
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_quiet_simulation_prints_the_summary_json(tiny_model: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\nsource = "{tiny_model}"\nmax_length = 32\n[train]\nrounds = 1\nlocal_steps = 2\n'
                   '[demo]\nexamples_per_site = 30\n[cohorts.retail]\nsites = 2\n')
    # 2 sites: below secure_aggregation.min_sites, so the cohort runs only when clear aggregation is allowed
    p = _run("simulate", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet", "--allow-clear-aggregation", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["rounds_completed"] == 1 and list(summary["cohorts"]) == ["retail"]
    assert (tmp_path / "run" / "adapters" / "retail" / "adapter_config.json").is_file()
    assert "rounds:" not in p.stderr, "--quiet shows no progress bar"


# `fedlora client`'s connection loop and its stop, with stand-ins for the SuperNode (a small process printing what
# Flower's prints) and for the ClientApp worker; the loop, the messages and the exit are the agent's own.
def _site(tmp_path: Path, **over):
    from fedlora.client.agent import SiteOptions

    return SiteOptions(**{"server": "127.0.0.1:9", "data": tmp_path / "d.csv", "domain": "finance", "name": "bank-a",
                          "insecure": True, "state_dir": tmp_path / "state", **over})


def _stand_ins(monkeypatch, lines: list[str]) -> list[list[str]]:
    """Each SuperNode started prints the next of ``lines`` and exits 1; returns their argv, one per start."""
    import threading

    from fedlora.client import agent

    started: list[list[str]] = []

    def spawn(args, env, *, stdout, cwd=None):
        line = lines[min(len(started), len(lines) - 1)]
        started.append(list(args))
        return subprocess.Popen([sys.executable, "-c", f"import sys; print({line!r}, flush=True); sys.exit(1)"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def start_worker(opts, port, stopping, busy, on_fatal):
        worker = threading.Thread(target=stopping.wait, daemon=True)
        worker.start()
        return worker

    monkeypatch.setattr(agent, "spawn", spawn)
    monkeypatch.setattr(agent, "check_site", lambda opts: None)
    monkeypatch.setattr(agent, "_start_worker", start_worker)
    return started


def test_client_tls_errors_fail_at_once_while_nothing_listening_is_retried(tmp_path: Path, monkeypatch) -> None:
    import pytest

    from fedlora.client.agent import run_site
    from fedlora.errors import DeploymentError

    # what Flower 1.41's SuperNode prints for a coordinator certificate from another CA, and for one not naming the host
    wrong_ca = "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate signature failure (_ssl.c:1006)"
    wrong_host = ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address mismatch, certificate is not valid for "
                  "'127.0.0.1'. (_ssl.c:1006)")
    said: list[str] = []
    for line, expected in ((wrong_ca, "TLS: the coordinator's certificate is not signed by the CA in ca.pem (wrong --root-cert?)"),
                           (wrong_host, "TLS: the coordinator's certificate does not name 127.0.0.1 (fedlora certs --hosts ...)")):
        started = _stand_ins(monkeypatch, [line])
        with pytest.raises(DeploymentError) as e:
            run_site(_site(tmp_path, root_cert=Path("ca.pem")), say=said.append)  # --connect-timeout 300 s by default
        assert len(started) == 1 and not any("retrying" in s for s in said)  # not retried
        assert str(e.value) == f"site bank-a cannot join the coordinator at 127.0.0.1:9: {expected}"
    started = _stand_ins(monkeypatch, ["[Errno 111] Connection refused"])
    with pytest.raises(DeploymentError, match="could not join the coordinator at 127.0.0.1:9 within 6 s: nothing answers at 127.0.0.1:9"):
        run_site(_site(tmp_path, connect_timeout=6.0), say=said.append)
    assert len(started) >= 2 and "fedlora client: nothing answers at 127.0.0.1:9 (is fedlora server running there, and the port "\
                                  "open?); retrying in 1 s" in said


# A site whose ClientApp worker is in the middle of a message (a training loop in torch, which never looks at a stop
# flag) when SIGTERM comes; the SuperNode stand-in serves the runtime port and says it is connected.
SITE_MID_MESSAGE = textwrap.dedent("""
    import subprocess, sys, threading
    from pathlib import Path
    from fedlora.client import agent

    SUPERNODE = (
        "import os, socket, sys, time\\n"
        "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[2]))); s.listen()\\n"
        "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid())); os.rename(sys.argv[1] + '.tmp', sys.argv[1])\\n"
        "print('INFO :      SuperNode ID: 7', flush=True)\\n"
        "time.sleep(600)"
    )

    def spawn(args, env, *, stdout, cwd=None):
        port = args[args.index("--port") + 1]
        return subprocess.Popen([sys.executable, "-c", SUPERNODE, sys.argv[1], port], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def start_worker(opts, port, stopping, busy, on_fatal):
        def work():
            import torch
            busy.set()
            print("training", flush=True)
            x = torch.randn(128, 128)
            while True:
                x = torch.tanh(x @ x)
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        return worker

    agent.spawn, agent.check_site, agent._start_worker = spawn, (lambda opts: None), start_worker
    agent.DRAIN_GRACE = 1.0  # (10 s) for the message under way: this one never ends
    opts = agent.SiteOptions(server="127.0.0.1:9", data=Path("d.csv"), domain="finance", name="bank-a", insecure=True,
                             state_dir=Path(sys.argv[2]))
    agent.run_site(opts, say=lambda text: print(text, flush=True), hard_exit=True)
    print("run_site returned", flush=True)
""")


def test_client_sigtermed_in_the_middle_of_a_message_exits_0_cleanly(tmp_path: Path) -> None:
    import signal

    from fedlora.processes import proc_info

    site = subprocess.Popen([sys.executable, "-c", SITE_MID_MESSAGE, str(tmp_path / "supernode.pid"), str(tmp_path / "state")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert site.stdout is not None
        seen = []
        while "training" not in seen and (line := site.stdout.readline()):
            seen.append(line.strip())
        assert "training" in seen, seen
        supernode = proc_info(int((tmp_path / "supernode.pid").read_text()))
        assert supernode is not None
        site.send_signal(signal.SIGTERM)
        out = site.stdout.read()
        assert site.wait(120) == 0, out
    finally:
        site.kill()
        site.wait(60)
    assert "fedlora client: site bank-a stopped in the middle of a message: its work on it is dropped and nothing of it was sent" in out
    assert out.rstrip().endswith("fedlora client: site bank-a stopped"), out
    assert "terminate called" not in out and "run_site returned" not in out  # ended at once, torch not torn down under the worker
    now = proc_info(supernode.pid)
    assert now is None or now.start != supernode.start or now.state == "Z"  # the SuperNode was stopped with it


def test_a_stopping_site_lets_the_message_under_way_be_answered_first() -> None:
    """``SuperNode.drain``: before the SuperNode is stopped, the worker finishes its message and
    the SuperNode reports the reply sent; a message that does not end in time (training) is left."""
    import threading
    import time

    from fedlora.client.agent import SuperNode

    node = SuperNode.__new__(SuperNode)  # its drain only, around a stand-in SuperNode process
    node.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    node.sent = 0
    try:
        busy = threading.Event()
        assert node.drain(busy) is True  # nothing under way: nothing to wait for

        def message() -> None:  # a short stage of a round: answered, then sent by the SuperNode
            time.sleep(0.3)
            busy.clear()
            time.sleep(0.3)
            node.sent += 1

        busy.set()
        threading.Thread(target=message, daemon=True).start()
        assert node.drain(busy, grace=60.0, send_wait=60.0) is True and node.sent == 1
        busy.set()  # training that goes on
        assert node.drain(busy, grace=0.5, send_wait=60.0) is False and node.sent == 1
    finally:
        node.proc.kill()
        node.proc.wait(60)
