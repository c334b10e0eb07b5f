"""Child processes of ``fedlora server`` and ``fedlora client`` (SuperLink, SuperNode, ``flwr``).

Every child dies with its parent: on Linux it is started with ``PR_SET_PDEATHSIG`` (SIGTERM
when the parent exits, even by SIGKILL), and the parent stops its children (SIGTERM, then
SIGKILL after a grace period) on every way out. Flower's own helpers (``flower-superexec``,
``flwr-serverapp``) watch their parent's pid and exit with it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from .errors import DeploymentError

BIN = Path(sys.executable).parent


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of Flower's processes: its home folder (all it writes goes there),
    this venv's bin first (Flower starts its helpers by name), no hub access."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(args: Sequence[str], env: Mapping[str, str], *, stdout: IO | int | None, cwd: Path | None = None) -> subprocess.Popen:
    """Start a Flower program from this venv's bin; it dies with this process."""
    exe = BIN / args[0]
    return subprocess.Popen([str(exe if exe.exists() else args[0]), *args[1:]], stdout=stdout, stderr=subprocess.STDOUT, env=dict(env),
                            cwd=cwd, preexec_fn=_die_with_parent, text=stdout == subprocess.PIPE)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


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
