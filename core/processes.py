"""Child processes of ``fedlora server`` and ``fedlora client`` (SuperLink, SuperNode, ``flwr``).

Every child dies with its parent: on Linux it is started with ``PR_SET_PDEATHSIG`` (SIGTERM
when the parent exits, even by SIGKILL), and the parent stops its children (SIGTERM, then
SIGKILL after a grace period) on every way out, and with each child whatever that child
started (Flower's ``flower-superexec`` and ``flwr-serverapp``, which watch their parent's pid
and exit with it, normally on their own).

Processes are known by identity: a pid and its start time (``/proc/<pid>/stat`` field 22). A
pid is reused once its process is reaped; the pair is not, so a signal never reaches a
process that merely inherited a pid (it is sent through a pidfd opened on the checked process).

SIGTERM is how systemd, Kubernetes and ``kill`` stop a service: under ``stop_signals`` it takes
the way out Ctrl-C takes (``Terminated``, a KeyboardInterrupt), and ``shielded`` keeps a second
signal from cutting the clean-up short. ``stop_all`` ends everything a process started, also
what Flower starts in sessions of its own, and (``become_subreaper``) what was orphaned meanwhile.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import DeploymentError

BIN = Path(sys.executable).parent


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of Flower's processes: its home folder (all it writes goes there),
    this venv's bin first (Flower starts its helpers by name), no hub access."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain(text: str) -> str:
    """``text`` without terminal colour and cursor codes (what Flower's console logger adds), for log files."""
    return _TERMINAL_CODES.sub("", text)


def log_pipe(path: Path) -> int:
    """The write end of a pipe whose lines a thread appends to ``path`` without terminal codes
    (``plain``): a child's stdout (and its children's, which inherit it) for a log file. The
    caller closes its copy of the write end once the child has it; the thread ends at EOF."""
    read_end, write_end = os.pipe()

    def copy() -> None:
        with open(read_end, encoding="utf-8", errors="replace") as src, path.open("a", encoding="utf-8") as dst:
            for line in src:
                dst.write(plain(line))
                dst.flush()

    threading.Thread(target=copy, name=f"log {path.name}", daemon=True).start()
    return write_end


def _die_with_parent(parent: int) -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os._exit(128 + signal.SIGTERM)


def spawn(args: Sequence[str], env: Mapping[str, str], *, stdout: IO | int | None, cwd: Path | None = None) -> subprocess.Popen:
    """Start a Flower program from this venv's bin; it dies with this process."""
    exe = BIN / args[0]
    return subprocess.Popen([str(exe if exe.exists() else args[0]), *args[1:]], stdout=stdout, stderr=subprocess.STDOUT, env=dict(env),
                            cwd=cwd, preexec_fn=functools.partial(_die_with_parent, os.getpid()), text=stdout == subprocess.PIPE)


KILL_WAIT = 30.0  # seconds to wait for a SIGKILLed process to be gone: a loaded machine is slow to tear down a big one


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``proc`` and its descendants: SIGTERM, wait up to ``grace`` seconds, SIGKILL, wait up
    to ``KILL_WAIT`` seconds; then the same for the descendants it leaves running. Bounded, and
    never raises for a process that is slow to go (a SIGKILLed one is the kernel's to finish)."""
    family = ProcessSet(descendants(proc.pid)) if proc.poll() is None else ProcessSet()
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(KILL_WAIT)
            except subprocess.TimeoutExpired:
                pass
    family.terminate(grace, KILL_WAIT)


@dataclass(frozen=True)
class ProcInfo:
    """One process as ``/proc/<pid>/stat`` shows it; ``key`` (pid, start time) identifies it."""

    pid: int
    ppid: int
    pgrp: int
    session: int
    state: str  # R, S, D, Z (zombie: exited, waiting for its parent's wait), T, ...
    start: int  # clock ticks after boot
    name: str

    @property
    def key(self) -> tuple[int, int]:
        return self.pid, self.start

    def describe(self) -> str:
        """``pid 123 (state S, parent 45): /path/to/program args`` (the name for a zombie)."""
        try:
            cmd = Path(f"/proc/{self.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = ""
        return f"pid {self.pid} (state {self.state}, parent {self.ppid}): {cmd or '[' + self.name + ']'}"


def _parse_stat(text: str) -> ProcInfo:
    name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
    return ProcInfo(pid=int(text[:text.index(" ")]), ppid=int(rest[1]), pgrp=int(rest[2]), session=int(rest[3]), state=rest[0],
                    start=int(rest[19]), name=name)


def proc_info(pid: int) -> ProcInfo | None:
    """The process ``pid`` now, or None when there is none (or no /proc: not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return _parse_stat(f.read())
    except (OSError, ValueError, IndexError):
        return None


def proc_table() -> dict[int, ProcInfo]:
    """Every process now, by pid (empty without /proc)."""
    out: dict[int, ProcInfo] = {}
    try:
        entries = os.scandir("/proc")
    except OSError:
        return out
    with entries:
        for e in entries:
            if e.name.isdigit() and (info := proc_info(int(e.name))) is not None:
                out[info.pid] = info
    return out


def descendants(pid: int, table: Mapping[int, ProcInfo] | None = None) -> list[ProcInfo]:
    """The children of ``pid``, their children, and so on (by parent pid, in one look at /proc)."""
    table = proc_table() if table is None else table
    children: dict[int, list[ProcInfo]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child.pid)
    return out


def send_signal(info: ProcInfo, sig: int) -> bool:
    """Send ``sig`` to the process ``info`` names, never to another one that got its pid since;
    False when it is gone (or not this user's)."""
    try:
        fd = os.pidfd_open(info.pid)
    except (ProcessLookupError, PermissionError):
        return False
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): check, then signal by pid
        fd = -1
    try:
        now = proc_info(info.pid)
        if now is None or now.start != info.start:
            return False
        if fd >= 0:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(info.pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if fd >= 0:
            os.close(fd)


class ProcessSet:
    """A set of processes known by identity that grows by descent: on each ``look()`` at /proc,
    a process whose parent is a member joins (with ``follow_sessions``, also one in a member's
    session), so children started meanwhile are counted too.

    A member is alive while its pid is there with its start time and it is not a zombie. A
    zombie has exited: it counts as gone, except a zombie that is this process's child: that
    one is handed to ``reap`` (which must wait for it: e.g. ``Popen.poll`` for a Popen child)
    and is alive until reaped. Without ``reap`` every zombie counts as gone.
    """

    def __init__(self, members: Iterable[ProcInfo] = (), *, follow_sessions: bool = False,
                 reap: Callable[[ProcInfo], None] | None = None) -> None:
        self.members: dict[tuple[int, int], ProcInfo] = {}
        self.follow_sessions, self.reap = follow_sessions, reap
        for m in members:
            self.add(m)

    def add(self, info: ProcInfo) -> None:
        self.members.setdefault(info.key, info)

    def look(self) -> list[ProcInfo]:
        """Read /proc once: take in new descendants, reap our zombie members; the live members."""
        table = proc_table()
        me = os.getpid()
        present = {p.key: p for p in table.values() if p.key in self.members}
        grew = True
        while grew:  # a child and its own child can both be new
            grew = False
            sessions = {p.session for p in present.values()} if self.follow_sessions else set()
            for p in table.values():
                if p.key in present or p.pid == me:
                    continue
                parent = table.get(p.ppid)
                if (parent is not None and parent.key in present) or p.session in sessions:
                    self.add(p)
                    present[p.key] = p
                    grew = True
        alive = []
        for p in present.values():
            if p.state == "Z":
                if p.ppid != me or self.reap is None:
                    continue  # exited; only another parent's wait is missing
                self.reap(p)
                now = proc_info(p.pid)
                if now is None or now.key != p.key:
                    continue
            alive.append(present[p.key])
        return alive

    def signal(self, sig: int, alive: Iterable[ProcInfo] | None = None) -> None:
        for p in self.look() if alive is None else alive:
            send_signal(p, sig)

    def wait_gone(self, timeout: float, poll: float = 0.1) -> list[ProcInfo]:
        """Look until no member is alive or ``timeout`` seconds have passed; the ones left."""
        deadline = time.monotonic() + timeout
        while (alive := self.look()) and time.monotonic() < deadline:
            time.sleep(poll)
        return alive

    def terminate(self, grace: float, kill_wait: float = KILL_WAIT) -> list[ProcInfo]:
        """SIGTERM every live member, wait up to ``grace`` s; SIGKILL the rest, wait up to
        ``kill_wait`` s. Returns the members still alive after that (normally none)."""
        alive = self.look()
        if not alive:
            return []
        self.signal(signal.SIGTERM, alive)
        if not (alive := self.wait_gone(grace)):
            return []
        self.signal(signal.SIGKILL, alive)
        return self.wait_gone(kill_wait)


def stop_all(procs: Sequence[subprocess.Popen], grace: float = 10.0, kill_wait: float = KILL_WAIT) -> list[ProcInfo]:
    """Stop everything this process started: ``procs`` and every other descendant of this
    process, Flower's SuperExec and ServerApp included (started in sessions of their own, they
    are still children of their parents; and under ``become_subreaper`` an orphan is a child of
    this process): SIGTERM to all at once, up to ``grace`` s, then SIGKILL to the rest, up to
    ``kill_wait`` s. A member's zombie is reaped here (``procs`` by their Popen, so that their
    exit status stays right). Returns what is still alive then (normally nothing)."""
    mine = {p.pid: p for p in procs}

    def reap(info: ProcInfo) -> None:
        if (p := mine.get(info.pid)) is not None:
            p.poll()
            return
        try:
            os.waitpid(info.pid, os.WNOHANG)
        except ChildProcessError:
            pass

    left = ProcessSet(descendants(os.getpid()), reap=reap).terminate(grace, kill_wait)
    for p in procs:
        p.poll()
    return left


def become_subreaper() -> bool:
    """Make this process the subreaper of its descendants (Linux ``PR_SET_CHILD_SUBREAPER``): one
    whose parent dies (Flower's SuperExec when the SuperLink goes, the ServerApp when SuperExec
    does) is reparented here instead of to init, so that ``stop_all`` still finds it. False where
    that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL("libc.so.6", use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (``stop_signals``): raised in the main thread where Ctrl-C raises
    KeyboardInterrupt, so that both leave the same way (every ``finally`` and ``__exit__`` runs)."""

    def __init__(self, signame: str = "SIGTERM") -> None:
        super().__init__(signame)
        self.signame = signame


@dataclass
class _StopState:
    raised: bool = False  # a stop signal was raised: later ones only noted
    shield: int = 0  # > 0 inside ``shielded()``: clean-up that a stop signal must not cut short
    note: Callable[[str], None] | None = None


_STOP = _StopState()


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextmanager
def stop_signals(note: Callable[[str], None] | None = None) -> Iterator[None]:
    """While inside (in the main thread; elsewhere it does nothing): the first SIGTERM raises
    ``Terminated`` and the first SIGINT KeyboardInterrupt, wherever the main thread is, except
    inside ``shielded()``; a later one, or one inside ``shielded()``, is only noted (``note``,
    default stderr) so that a second Ctrl-C cannot cut the clean-up short (SIGKILL still ends the
    process). The previous handlers are restored on leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if _STOP.raised or _STOP.shield:
            (_STOP.note or _note)(f"fedlora: {name}: already stopping (waiting for the processes to end; SIGKILL ends it at once)")
            return
        _STOP.raised = True
        raise Terminated(name) if signum == signal.SIGTERM else KeyboardInterrupt()

    before = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    saved = (_STOP.raised, _STOP.shield, _STOP.note)
    _STOP.raised, _STOP.shield, _STOP.note = False, 0, note
    try:
        yield
    finally:
        for sig, h in before.items():
            signal.signal(sig, h)
        _STOP.raised, _STOP.shield, _STOP.note = saved


@contextmanager
def shielded() -> Iterator[None]:
    """A block that no stop signal interrupts (``stop_signals``): one that arrives meanwhile is
    noted, not raised; neither now nor afterwards (this is the clean-up of a process that is
    ending anyway)."""
    _STOP.shield += 1
    try:
        yield
    finally:
        _STOP.shield -= 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen, describe: Callable[[], str]) -> None:
    """Wait until something listens on ``host:port``; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(f"{Path(str(proc.args[0])).name} exited with status {proc.returncode}: {describe()}")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(f"{Path(str(proc.args[0])).name} did not listen on {host}:{port} within {timeout:.0f} s: {describe()}")


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``)."""
    from .errors import ConfigError

    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(flag, text, "must be HOST:PORT, e.g. 127.0.0.1:9092")
    return host, int(port)


def tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""
