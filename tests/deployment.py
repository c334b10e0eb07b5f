"""Real Flower deployment processes on loopback for tests: a SuperLink, SuperNodes, `flwr run`.

Everything Flower writes goes under one temporary FLWR_HOME; every process starts in its own
session and is killed with its whole group on exit (SuperNodes fork SuperExec and ClientApp
processes), so nothing outlives the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from fedlora.processes import BIN, flower_env, free_port, tail, wait_for_port


class LocalDeployment:
    """``with LocalDeployment(tmp) as d: d.site(...); d.run(project)``: an insecure SuperLink on loopback."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "flwr-home"
        self.logs = root / "logs"
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.env = flower_env(self.home)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log.open("w"), stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.root, start_new_session=True)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> LocalDeployment:
        self.home.mkdir(parents=True)
        self.logs.mkdir(parents=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        proc = self._start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                                         "--disable-runtime-dependency-installation"])
        wait_for_port("127.0.0.1", self.port, 60, proc, lambda: tail(self.logs / "superlink.log"))
        return self

    def site(self, name: str, domain: str, data: Path, state: Path) -> None:
        """``fedlora client --insecure`` (SuperNode + warm ClientApp) for one site."""
        self._start(name, ["fedlora", "client", "--insecure", "--server", f"127.0.0.1:{self.port}", "--domain", domain, "--name", name,
                           "--data", str(data), "--state-dir", str(state)])

    def run(self, project: Path, timeout: float, run_config: dict[str, object] | None = None) -> subprocess.CompletedProcess:
        """``flwr run PROJECT --stream [--run-config ...]``: returns when the run ends (its ServerApp's output included)."""
        extra = []
        if run_config:
            extra = ["--run-config", " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())]
        return subprocess.run([str(BIN / "flwr"), "run", str(project), "--stream", *extra], capture_output=True, text=True, env=self.env,
                              cwd=self.root, timeout=timeout)

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever its children left behind
            except ProcessLookupError:
                pass


def live_processes(groups: set[int]) -> list[str]:
    """Processes (not zombies) still running in the given process groups, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        state, pgrp = rest[0], int(rest[2])
        if pgrp in groups and state != "Z":
            out.append(f"{stat.parent.name} {name}")
    return out


FEDLORA = BIN / "fedlora"


class Processes:
    """``fedlora server`` / ``fedlora client`` processes of one test, each in its own session
    (so that a kill reaches its whole group: SuperLink, SuperNode, Flower's helpers); on exit
    every group is killed and nothing may be left running."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.groups: set[int] = set()
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "FLWR_HOME": str(root / "flwr-home-unused")}  # whatever Flower writes outside a run's own home lands here

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen([str(FEDLORA), *args], stdout=log.open("a"), stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                start_new_session=True)
        self.procs[name] = proc
        self.groups.add(proc.pid)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.procs[name].pid, sig)
        except ProcessLookupError:
            pass
        self.procs[name].wait(30)

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout} s; its log:\n{self.log(name)[-4000:]}") from None

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and live_processes(self.groups):
            time.sleep(0.2)
        for pgid in self.groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
