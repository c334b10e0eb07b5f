"""Stopping process trees and checking they are gone (tests/deployment.py, fedlora.processes),
with small Python processes instead of Flower's: a child that leaves its parent's session and
ignores SIGTERM (as ``flower-superexec`` leaves the SuperLink's), an orphan, a pid reused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deployment import ProcessTree, live_processes, wait_for
from fedlora.processes import ProcessSet, proc_info, send_signal, spawn, stop

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# script lines (inside the scripts below): start a grandchild in a session of its own that ignores SIGTERM and
# writes its pid to argv[1] once its SIGTERM handler is in place (so a loaded machine cannot deliver SIGTERM before it is)
SPAWN_IGNORING_GRANDCHILD = """
    grandchild = (
        "import os, signal, sys, time\\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
        "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid())); os.rename(sys.argv[1] + '.tmp', sys.argv[1])\\n"
        "time.sleep(600)"
    )
    subprocess.Popen([sys.executable, "-c", grandchild, sys.argv[1]], start_new_session=True)
"""
# a child that starts such a grandchild, then sleeps
STUBBORN_CHILD = textwrap.dedent("""
    import subprocess, sys, time
""" + SPAWN_IGNORING_GRANDCHILD + """
    time.sleep(600)
""")


def wait_file(path: Path, proc: subprocess.Popen) -> int:
    """The pid the helper ``proc`` wrote to ``path``."""
    wait_for(lambda: path.exists() or proc.poll() is not None, 60, f"{path.name} from the helper process")
    assert path.exists(), f"the helper process exited with {proc.returncode}"
    return int(path.read_text())


def start_root(tree: ProcessTree, code: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], start_new_session=True)
    tree.add(proc)
    return proc


def alive(pid: int, start: int) -> bool:
    now = proc_info(pid)
    return now is not None and now.start == start and now.state != "Z"


def test_shutdown_stops_a_child_that_left_the_group_and_ignores_sigterm(tmp_path: Path) -> None:
    tree = ProcessTree(poll=0.05)
    root = start_root(tree, STUBBORN_CHILD, str(tmp_path / "pid"))
    child = wait_file(tmp_path / "pid", root)
    info = proc_info(child)
    assert info is not None and info.session != root.pid and info.pgrp != root.pid  # out of reach of killpg(root)
    assert child in {p.pid for p in tree.alive()}  # ... yet in the tree: its parent is
    tree.shutdown(term_grace=1.0, kill_wait=30.0)
    assert live_processes(tree, timeout=30.0) == []
    assert not alive(child, info.start)
    assert [x.split(" (")[0] for x in tree.needed_kill] == [f"pid {child}"]  # it took SIGKILL, its parent did not
    assert root.returncode == -signal.SIGTERM  # reaped by its Popen: the exit status is the real one


def test_an_orphan_reparented_to_us_is_followed_and_reaped(tmp_path: Path) -> None:
    tree = ProcessTree(poll=0.05)
    code = textwrap.dedent("""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open(sys.argv[1] + ".tmp", "w").write(str(child.pid)); os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(1.0)
        os._exit(3)  # the child is orphaned
    """)
    root = start_root(tree, code, str(tmp_path / "pid"))
    child = wait_file(tmp_path / "pid", root)
    start = proc_info(child).start
    assert root.wait(60) == 3
    assert proc_info(child).ppid == os.getpid()  # reparented to us, the subreaper (the kernel does it before the parent's exit is seen)
    assert child in {p.pid for p in tree.alive()}
    tree.shutdown(term_grace=30.0)
    assert live_processes(tree, timeout=30.0) == []
    assert proc_info(child) is None or proc_info(child).start != start  # reaped, not left as our zombie


def test_live_processes_names_a_process_that_stays(tmp_path: Path) -> None:
    tree = ProcessTree(poll=0.05)
    root = start_root(tree, "import time; time.sleep(600)")
    try:
        left = live_processes(tree, timeout=0.5)
        assert len(left) == 1 and left[0].startswith(f"pid {root.pid} (state ") and "time.sleep(600)" in left[0]
    finally:
        tree.shutdown(term_grace=30.0)
    assert live_processes(tree, timeout=30.0) == []


def test_stop_takes_the_childs_detached_descendants_along(tmp_path: Path) -> None:
    proc = spawn([sys.executable, "-c", STUBBORN_CHILD, str(tmp_path / "pid")], dict(os.environ), stdout=subprocess.DEVNULL)
    child = wait_file(tmp_path / "pid", proc)
    start = proc_info(child).start
    stop(proc, grace=1.0)
    assert proc.returncode == -signal.SIGTERM
    assert not alive(child, start)  # SIGKILLed after the grace; a zombie of init's counts as gone


def test_a_signal_never_reaches_a_process_that_only_has_the_pid(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        info = proc_info(proc.pid)
        impostor = type(info)(**{**info.__dict__, "start": info.start + 1})  # the same pid, another process
        assert send_signal(impostor, signal.SIGKILL) is False
        assert proc.poll() is None
        assert ProcessSet([impostor]).look() == []  # not a member either
        assert send_signal(info, signal.SIGKILL) is True
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait(60)


def _signal_self(sig: int) -> None:
    """``sig`` to this process; its Python handler has run when this returns (or raised out of it)."""
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # the handler runs before the sleep starts, or interrupts it


def test_sigterm_under_stop_signals_leaves_as_ctrl_c_does_and_a_second_one_is_only_noted() -> None:
    from fedlora.processes import Terminated, shielded, stop_signals

    notes: list[str] = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as raised, stop_signals(note=notes.append):
        try:
            _signal_self(signal.SIGTERM)
            raise AssertionError("SIGTERM did not raise")
        finally:  # the clean-up: a second signal of either kind is noted, not raised
            _signal_self(signal.SIGTERM)
            _signal_self(signal.SIGINT)
    assert isinstance(raised.value, KeyboardInterrupt) and raised.value.signame == "SIGTERM"
    assert [n.split(":")[1].strip() for n in notes] == ["SIGTERM", "SIGINT"] and "already stopping" in notes[0]
    assert signal.getsignal(signal.SIGTERM) is before  # restored on leaving
    with stop_signals(note=notes.append):
        with shielded():  # the clean-up after a normal end: a signal is noted, and not raised later either
            _signal_self(signal.SIGINT)
        time.sleep(0.05)
    assert len(notes) == 3
    with pytest.raises(KeyboardInterrupt) as raised, stop_signals(note=notes.append):
        _signal_self(signal.SIGINT)
    assert type(raised.value) is KeyboardInterrupt  # Ctrl-C stays Ctrl-C


# A stand-in for `fedlora server`: the subreaper of its processes, SIGTERM as Ctrl-C; it starts a child that starts
# a grandchild in a session of its own which ignores SIGTERM (as Flower's SuperExec leaves the SuperLink's session),
# and the child exits: the grandchild is orphaned. On SIGTERM it stops everything it started (processes.stop_all).
SERVER_STANDIN = textwrap.dedent("""
    import os, subprocess, sys, time
    from fedlora.processes import become_subreaper, shielded, stop_all, stop_signals, Terminated
    assert become_subreaper()
    with stop_signals():
        try:
            child = subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[1]])
            child.wait()  # it wrote the grandchild's pid and exited: the grandchild is ours now
            root = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            print("ready", flush=True)
            time.sleep(600)
        except Terminated as e:
            with shielded():
                print(f"stopping on {e.signame}", flush=True)
                left = stop_all([root], grace=5.0, kill_wait=30.0)
                print(f"left {len(left)} root {root.returncode}", flush=True)
            sys.exit(130)
""")
ORPHANING_CHILD = textwrap.dedent("""
    import os, subprocess, sys, time
""" + SPAWN_IGNORING_GRANDCHILD + """
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.01)
""")


def test_sigterm_stops_everything_the_process_started_even_an_orphan_in_another_session(tmp_path: Path) -> None:
    tree = ProcessTree(poll=0.05)
    try:
        server = subprocess.Popen([sys.executable, "-c", SERVER_STANDIN, str(tmp_path / "pid"), ORPHANING_CHILD], start_new_session=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tree.add(server)
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        orphan = int((tmp_path / "pid").read_text())
        info = proc_info(orphan)
        assert info is not None and info.ppid == server.pid  # reparented to its subreaper, not to init or to us
        assert info.session != server.pid
        server.send_signal(signal.SIGTERM)  # to the process only, as systemd (KillMode=mixed) and Kubernetes do
        assert server.stdout.readline().strip() == "stopping on SIGTERM"
        server.send_signal(signal.SIGTERM)  # again, during the clean-up (the orphan ignores SIGTERM: it takes the 5 s grace)
        rest = server.stdout.read()
        assert server.wait(60) == 130
        assert "already stopping" in rest and "left 0 root -15" in rest, rest
        assert not alive(orphan, info.start)  # SIGKILLed after the grace, and reaped by the server
        assert live_processes(tree, timeout=30.0) == []
    finally:
        tree.shutdown(term_grace=5.0)
