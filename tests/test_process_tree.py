"""Stopping process trees and checking they are gone (tests/deployment.py, fedlora.processes),
with small Python processes instead of Flower's: a child that leaves its parent's session and
ignores SIGTERM (as ``flower-superexec`` leaves the SuperLink's), an orphan, a pid reused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deployment import ProcessTree, live_processes, wait_for
from fedlora.processes import ProcessSet, proc_info, send_signal, spawn, stop

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# a child in a session of its own that ignores SIGTERM, then sleeps; the child itself writes its pid to
# argv[1] once its SIGTERM handler is in place (so a loaded machine cannot deliver SIGTERM before it is)
STUBBORN_CHILD = textwrap.dedent("""
    import subprocess, sys, time
    grandchild = (
        "import os, signal, sys, time\\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
        "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid())); os.rename(sys.argv[1] + '.tmp', sys.argv[1])\\n"
        "time.sleep(600)"
    )
    subprocess.Popen([sys.executable, "-c", grandchild, sys.argv[1]], start_new_session=True)
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
