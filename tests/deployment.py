"""Real Flower deployment processes on loopback for tests: a SuperLink, SuperNodes, `flwr run`.

Everything Flower writes goes under one temporary FLWR_HOME; every process starts in its own
session, and a ``ProcessTree`` follows each one and everything it starts: children of children
(``flower-superexec``, which the SuperLink starts in a session of its own, ``flwr-serverapp``,
``flower-supernode``), also once orphaned, because the test process is their subreaper
(``PR_SET_CHILD_SUBREAPER``) while a tree is open. On exit every one of them is stopped
(SIGTERM, a bounded wait, SIGKILL, a bounded wait; a process that joins the tree meanwhile gets
the same signal) and ``live_processes`` names whatever is still alive after a generous deadline:
a busy machine is slow, a process that stays is a bug. Every check waits, none looks once:
``leftovers_of`` waits for one started process and everything it started to be gone.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from fedlora.processes import BIN, ProcessSet, ProcInfo, flower_env, free_port, proc_info, send_signal, tail, wait_for_port

TERM_GRACE = 30.0  # seconds for a graceful exit after SIGTERM (a site stops its SuperNode, then its worker: 18 s seen on 2 busy cores)
KILL_WAIT = 60.0  # seconds for SIGKILLed processes to be gone (tearing down torch processes on 2 busy cores)
CHECK_WAIT = 60.0  # seconds live_processes waits before it names a process as left behind

_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37
_subreaper_lock = threading.Lock()
_subreaper_users = 0
_subreaper_before = 0


def _prctl(option: int, arg: int | ctypes.c_int | object) -> int:
    return int(ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, arg, 0, 0, 0))


def _subreaper(on: bool) -> None:
    """Make this process the subreaper of its descendants while at least one tree is open (an
    orphan is then reparented here, not to init: it stays in view and is reaped by us);
    restore the previous setting when the last one closes."""
    global _subreaper_users, _subreaper_before
    if not sys.platform.startswith("linux"):
        return
    with _subreaper_lock:
        if on:
            if _subreaper_users == 0:
                before = ctypes.c_int(0)
                _prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(before))
                _subreaper_before = before.value
                _prctl(_PR_SET_CHILD_SUBREAPER, 1)
            _subreaper_users += 1
        else:
            _subreaper_users -= 1
            if _subreaper_users == 0:
                _prctl(_PR_SET_CHILD_SUBREAPER, _subreaper_before)


class ProcessTree:
    """The processes one test starts (``add``: a ``Popen`` in a session of its own) and every
    process they start, known by pid and start time.

    A process belongs to the tree when its parent or its session does (see ``ProcessSet``). A
    watcher thread looks at /proc every ``poll`` seconds: it takes in new processes before they
    can be orphaned and reaps the orphans reparented to us once they exit, so that Flower's
    helpers, which exit when their parent's pid is gone, see a dead parent go. Roots are reaped
    by their ``Popen`` (``poll``), never behind its back, so their exit status stays right.
    """

    def __init__(self, poll: float = 0.2) -> None:
        self.roots: dict[int, subprocess.Popen] = {}
        self._lock = threading.RLock()
        self._set = ProcessSet(follow_sessions=True, reap=self._reap)
        self._stop = threading.Event()
        self._closed = False
        self.needed_kill: list[str] = []  # what SIGTERM did not stop within the grace (diagnostics)
        _subreaper(True)
        self._watcher = threading.Thread(target=self._watch, args=(poll,), name="process-tree", daemon=True)
        self._watcher.start()

    def add(self, proc: subprocess.Popen) -> None:
        info = proc_info(proc.pid)
        with self._lock:
            self.roots[proc.pid] = proc
            if info is not None:
                self._set.add(info)

    def _reap(self, p: ProcInfo) -> None:  # called with the lock held, for a zombie child of ours
        root = self.roots.get(p.pid)
        if root is not None:
            root.poll()
            return
        try:
            os.waitpid(p.pid, os.WNOHANG)  # an orphan of the tree, reparented to us: no Popen waits for it
        except ChildProcessError:
            pass

    def alive(self) -> list[ProcInfo]:
        """One look at /proc: the tree's processes alive now (our zombies reaped first)."""
        with self._lock:
            return self._set.look()

    def _watch(self, poll: float) -> None:
        while not self._stop.wait(poll):
            self.alive()

    def signal_group(self, root: subprocess.Popen, sig: int) -> None:
        """``sig`` to the process group of ``root`` (a session leader) and every tree process in it."""
        with self._lock:
            if root.returncode is None:  # not reaped (only we reap, under this lock): its pid, the group's id, is still its own
                try:
                    os.killpg(root.pid, sig)
                except ProcessLookupError:
                    pass
            for p in self._set.look():
                if p.pgrp == root.pid:
                    send_signal(p, sig)

    def _signal_all(self, sig: int) -> None:
        with self._lock:
            for root in self.roots.values():
                if root.returncode is None:  # not reaped: its pid is still its own
                    try:
                        os.killpg(root.pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            self._set.signal(sig)

    def _wait_gone(self, timeout: float, resend: int | None = None) -> list[ProcInfo]:
        """Look until the tree is gone or ``timeout`` s have passed; with ``resend``, that signal goes
        to every process that joined the tree since it was sent (a dying parent may still start one)."""
        deadline = time.monotonic() + timeout
        sent = {p.key for p in self.alive()}
        while (alive := self.alive()) and time.monotonic() < deadline:
            if resend is not None:
                for p in alive:
                    if p.key not in sent:
                        send_signal(p, resend)
                        sent.add(p.key)
            time.sleep(0.1)
        return alive

    def subtree(self, root: subprocess.Popen) -> list[ProcInfo]:
        """``root`` and every process of the tree descended from it (by the parent each had when
        first seen: also one orphaned since, or in a session of its own), alive or not."""
        with self._lock:
            members = list(self._set.members.values())
        keys = {p.key for p in members if p.pid == root.pid}
        grew = True
        while grew:
            pids = {k[0] for k in keys}
            new = {p.key for p in members if p.ppid in pids and p.key not in keys}
            keys |= new
            grew = bool(new)
        return [p for p in members if p.key in keys]

    def leftovers_of(self, root: subprocess.Popen, timeout: float = CHECK_WAIT) -> list[str]:
        """Wait up to ``timeout`` s for ``root`` and all it started to be gone; a description of
        each still alive then (``[]`` when none)."""
        deadline = time.monotonic() + timeout
        while True:
            keys = {p.key for p in self.subtree(root)}
            alive = [p for p in self.alive() if p.key in keys]
            if not alive or time.monotonic() >= deadline:
                return sorted(p.describe() for p in alive)
            time.sleep(0.1)

    def shutdown(self, term_grace: float = TERM_GRACE, kill_wait: float = KILL_WAIT) -> None:
        """SIGTERM to every process of the tree (and every root's group); wait until all are
        gone, at most ``term_grace`` s; SIGKILL to those left, wait at most ``kill_wait`` s.
        Then the watcher stops and the subreaper setting is restored; ``leftovers`` tells
        whether anything stayed."""
        started = time.monotonic()
        try:
            if running := self.alive():
                self._signal_all(signal.SIGTERM)
                self._signal_all(signal.SIGCONT)  # a process a test paused (``pause``) acts on its SIGTERM
                if stayed := self._wait_gone(term_grace, resend=signal.SIGTERM):
                    self.needed_kill = sorted(p.describe() for p in stayed)
                    print(f"process tree: {len(stayed)} process(es) still running {term_grace:.0f} s after SIGTERM, SIGKILLed:",
                          *self.needed_kill, sep="\n  ", file=sys.stderr)
                    self._signal_all(signal.SIGKILL)
                    self._wait_gone(kill_wait, resend=signal.SIGKILL)
                print(f"process tree: {len(running)} process(es) running at shutdown, {len(self._set.members)} seen in all; "
                      f"shutdown took {time.monotonic() - started:.1f} s", file=sys.stderr)
        finally:
            self._stop.set()
            self._watcher.join(10)
            if not self._closed:
                self._closed = True
                _subreaper(False)

    def leftovers(self, timeout: float = CHECK_WAIT) -> list[str]:
        """Wait up to ``timeout`` s for the tree to be gone; a description (pid, state, parent,
        command line) of each process still alive then, sorted; [] when none."""
        return sorted(p.describe() for p in self._wait_gone(timeout))


def live_processes(tree: ProcessTree, timeout: float = CHECK_WAIT) -> list[str]:
    """The tree's processes still alive after up to ``timeout`` seconds (zombies of another
    parent are gone; ours are reaped), each as ``pid N (state S, parent P): command line``."""
    return tree.leftovers(timeout)


class _Started:
    """What ``LocalDeployment`` and ``Processes`` share: the processes started by name (each in a
    session of its own), their logs, signals to them and checks that they are gone."""

    procs: dict[str, subprocess.Popen]
    tree: ProcessTree | None
    logs: Path

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout} s; its log:\n{self.log(name)[-4000:]}") from None

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = KILL_WAIT) -> None:
        """``sig`` to the whole group of ``name``; returns once ``name`` itself has exited."""
        assert self.tree is not None
        self.tree.signal_group(self.procs[name], sig)
        self.wait(name, timeout)

    def signal(self, name: str, sig: int = signal.SIGTERM) -> None:
        """``sig`` to the process ``name`` only, as systemd (``KillMode=mixed``), Kubernetes and
        ``kill PID`` send it: the process must end what it started itself."""
        proc = self.procs[name]
        info = proc_info(proc.pid)
        assert proc.returncode is None and info is not None, f"{name} is not running"
        send_signal(info, sig)

    def leftovers_of(self, name: str, timeout: float = CHECK_WAIT) -> list[str]:
        """Wait (up to ``timeout`` s) until ``name`` and every process it started are gone; each one
        still alive then, described (``[]``: none)."""
        assert self.tree is not None
        return self.tree.leftovers_of(self.procs[name], timeout)

    def pause(self, name: str) -> None:
        """SIGSTOP to the process ``name`` only: for a ``fedlora client``, its ClientApp worker
        stops answering while its SuperNode (another process) stays connected, so that the
        coordinator waits for this site (a slow site) without counting it as offline. Only while
        the worker is between messages is that safe for long: Flower expires a task whose
        heartbeat stops for a minute."""
        self.signal(name, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.signal(name, signal.SIGCONT)


class LocalDeployment(_Started):
    """``with LocalDeployment(tmp) as d: d.site(...); d.run(project)``: an insecure SuperLink on loopback.
    ``d.submit(project)`` starts ``flwr run`` without waiting (``d.wait("flwr-run", ...)``), so that
    a test can act during the run, e.g. ``d.kill(site)``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "flwr-home"
        self.logs = root / "logs"
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = flower_env(self.home)
        self.tree: ProcessTree | None = None
        self._files: list[IO] = []

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        if self.tree is None:
            raise RuntimeError("LocalDeployment starts processes only inside its `with` block")
        log = (self.logs / f"{name}.log").open("w")
        self._files.append(log)
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.root, start_new_session=True)
        self.procs[name] = proc
        self.tree.add(proc)
        return proc

    def __enter__(self) -> LocalDeployment:
        self.home.mkdir(parents=True)
        self.logs.mkdir(parents=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.tree = ProcessTree()
        try:
            proc = self._start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                                             "--disable-runtime-dependency-installation"])
            wait_for_port("127.0.0.1", self.port, 60, proc, lambda: tail(self.logs / "superlink.log"))
        except BaseException:
            self.__exit__()
            raise
        return self

    def site(self, name: str, domain: str, data: Path, state: Path, label: str | None = None) -> subprocess.Popen:
        """``fedlora client --insecure`` (SuperNode + warm ClientApp) for site ``name``, a process
        of the tree named ``label`` (default ``name``; another label for the same site restarted)."""
        return self._start(label or name, ["fedlora", "client", "--insecure", "--server", f"127.0.0.1:{self.port}", "--domain", domain,
                                           "--name", name, "--data", str(data), "--state-dir", str(state)])

    @staticmethod
    def _run_args(project: Path, run_config: dict[str, object] | None) -> list[str]:
        extra = []
        if run_config:
            extra = ["--run-config", " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())]
        return ["flwr", "run", str(project), "--stream", *extra]

    def run(self, project: Path, timeout: float, run_config: dict[str, object] | None = None) -> subprocess.CompletedProcess:
        """``flwr run PROJECT --stream [--run-config ...]``: returns when the run ends (its ServerApp's output included)."""
        return subprocess.run([str(BIN / "flwr"), *self._run_args(project, run_config)[1:]], capture_output=True, text=True, env=self.env,
                              cwd=self.root, timeout=timeout)

    def submit(self, project: Path, run_config: dict[str, object] | None = None, name: str = "flwr-run") -> subprocess.Popen:
        """``flwr run PROJECT --stream [--run-config ...]`` in the background, a process of the tree
        named ``name`` (its output, the ServerApp's included, in ``d.log(name)``)."""
        return self._start(name, self._run_args(project, run_config))

    def __exit__(self, *exc: object) -> None:
        try:
            if self.tree is not None:
                self.tree.shutdown()
        finally:
            for f in self._files:
                f.close()


FEDLORA = BIN / "fedlora"


class Processes(_Started):
    """``fedlora server`` / ``fedlora client`` processes of one test, each in its own session
    (so that a kill reaches its whole group: SuperLink, SuperNode, Flower's helpers); on exit
    the whole tree is stopped, and ``live_processes(p.tree)`` must then be empty."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.tree: ProcessTree | None = None
        self._files: list[IO] = []
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "FLWR_HOME": str(root / "flwr-home-unused")}  # whatever Flower writes outside a run's own home lands here

    @property
    def groups(self) -> set[int]:
        """The process groups (= sessions) started: one per ``start``."""
        return {p.pid for p in self.procs.values()}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        if self.tree is None:
            raise RuntimeError("Processes starts processes only inside its `with` block")
        log = (self.logs / f"{name}.log").open("a")
        self._files.append(log)
        proc = subprocess.Popen([str(FEDLORA), *args], stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                start_new_session=True)
        self.procs[name] = proc
        self.tree.add(proc)
        return proc

    def __enter__(self) -> Processes:
        self.tree = ProcessTree()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.tree is not None:
                self.tree.shutdown()
        finally:
            for f in self._files:
                f.close()


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
