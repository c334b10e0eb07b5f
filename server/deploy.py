"""``fedlora server``: the coordinator of a real deployment, on Flower's Deployment Engine.

What it does, in order (nothing is started before everything is checked):

1. build and validate the run config (``--config`` plus flags), the model, the cohorts'
   labels, the TLS files; create the run directory and write ``config.toml`` (or, with
   ``--resume RUN_DIR``, read both back and check the checkpoint);
2. start Flower's SuperLink behind fedlora's gate (``fedlora.server.superlink_gate``) with TLS
   (``--certs DIR``, or ``DIR/coordinator`` when it exists: server.pem, server.key, ca.pem;
   never ca.key) and SuperNode authentication. Its Control and Runtime APIs listen on a
   loopback port only (``127.0.0.1:<free port>``: this process's ``flwr`` CLI, SuperExec and
   the ServerApp); ``--address`` is the public one and serves the Fleet API (the sites'
   SuperNodes) and nothing else;
3. register every ``<site>.pub`` of the certs folder (the allowlist) over the loopback Control
   API, which gives each site its node id; only then does ``--address`` listen (a site that
   connects earlier is refused the connection and retries, never told its key is unknown);
4. submit the fedlora ServerApp with ``flwr run`` (a Flower App written into
   ``RUN_DIR/.flower/app`` whose run config points at the run directory; the gate accepts this
   one FAB, once, and no other StartRun) and stream its log;
5. when the run ends, stop every process and remove ``RUN_DIR/.flower`` (Flower's home folder
   for this run: nothing is written outside the run directory).

Before anything starts: the sites expected (``--min-sites``, default the config's total) are
checked against the site keys there are to register; a run directory holds one ``fedlora
server`` at a time (an advisory lock on the folder); and a run directory a failed start left
behind (no round completed, so nothing to resume) is cleared for the retry, its logs kept.

The ServerApp waits for the sites (``--min-sites``, ``--wait-timeout``), trains, checkpoints
after every round and writes the run directory exactly as ``fedlora simulate`` does; it
records a failure in ``RUN_DIR/error.json``, which this process turns into its exit status.
Exit codes are the CLI's (0 done, 6 the federation failed, 9 deployment problems, 130
interrupted: resume with ``fedlora server --resume RUN_DIR``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import tomli_w

from fedlora.config import RunConfig
from fedlora.errors import ConfigError, DeploymentError, FederationError, FedloraError, RunInterrupted
from fedlora.files import write_text_atomic
from fedlora.processes import (Terminated, flower_env, free_port, log_pipe, parse_address, plain, shielded, spawn, stop_all, tail,
                               wait_for_port)

from .certs import check_server_certs, coordinator_dir, site_public_keys
from .checkpoint import open_stopped_run
from .rundir import RunDir

log = logging.getLogger("fedlora.server")

FLOWER_DIR = ".flower"  # Flower's home folder for this run, removed when the run ends
CONNECTION = "fedlora"  # the flwr CLI's name for this run's SuperLink (its loopback Control API)
GATE_READY = "gate-ready.json"  # in FLOWER_DIR: written once the site keys are registered (opens --address to the sites)
# what a start that completed no round leaves in its run directory (nothing to resume from): cleared for a retry
START_LEFTOVERS = frozenset({"config.toml", "logs", "error.json", "sites.json", "metrics.jsonl", FLOWER_DIR})


@dataclass(frozen=True)
class ServerPlan:
    cfg: RunConfig
    run_dir: RunDir
    host: str
    port: int
    certs: Path | None  # None: --insecure
    min_sites: int
    wait_timeout: float
    resume: bool


def flower_app_toml(run_config: dict[str, object]) -> str:
    """A Flower App (pyproject.toml) whose components are fedlora's installed apps."""
    return tomli_w.dumps({
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedlora-run", "version": "1.0.0", "description": "fedlora's ServerApp and ClientApp, as installed",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "fedlora",
                                  "components": {"serverapp": "fedlora.server.app:app", "clientapp": "fedlora.client.app:app"},
                                  "config": run_config}}},
    })


class Deployment:
    """The processes of one ``fedlora server`` run; ``with`` stops them all and removes
    Flower's home folder on every way out."""

    def __init__(self, plan: ServerPlan, out: IO[str]) -> None:
        self.plan, self.out = plan, out
        self.home = plan.run_dir.path.resolve() / FLOWER_DIR
        self.logs = plan.run_dir.path.resolve() / "logs"
        self.procs: list[subprocess.Popen] = []
        self.env = flower_env(self.home)
        # the SuperLink's Control and Runtime APIs: loopback only, for this process's flwr CLI, SuperExec and the ServerApp
        # (over TLS with server.pem, which names 127.0.0.1: fedlora certs always adds it)
        self.control_port = free_port("127.0.0.1")
        # where this process checks that the public (Fleet) socket listens
        self.local = "127.0.0.1" if plan.host in ("0.0.0.0", "::", "localhost", "127.0.0.1") else plan.host
        self.gate: subprocess.Popen | None = None

    def __enter__(self) -> Deployment:
        shutil.rmtree(self.home, ignore_errors=True)  # a stale one from a killed run
        self.home.mkdir(parents=True)
        self.logs.mkdir(exist_ok=True)
        conn: dict[str, object] = {"address": f"127.0.0.1:{self.control_port}"}
        conn.update({"insecure": True} if self.plan.certs is None else {"root-certificates": str(self.plan.certs / "ca.pem")})
        (self.home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))
        return self

    def __exit__(self, kind: type[BaseException] | None = None, *_: object) -> None:
        """Stop every process of the run, Flower's SuperExec and ServerApp included (``stop_all``:
        SIGTERM, then SIGKILL for what is left after the grace), then remove Flower's home folder.
        A second Ctrl-C or SIGTERM meanwhile does not cut it short (``shielded``)."""
        with shielded():
            if kind is not None and issubclass(kind, KeyboardInterrupt):
                why = "SIGTERM" if issubclass(kind, Terminated) else "interrupted"
                self.say(f"{why}: stopping the SuperLink, the ServerApp and every process they started")
            left = stop_all(list(reversed(self.procs)))
            if left:
                log.warning("still running after SIGKILL: %s", "; ".join(p.describe() for p in left))
            shutil.rmtree(self.home, ignore_errors=True)

    def start_superlink(self) -> None:
        """The SuperLink behind the gate, serving its loopback port; ``--address`` is bound (a port
        in use fails here) but listens only after ``open_to_sites``."""
        p = self.plan
        flower = ["--host", "127.0.0.1", "--port", str(self.control_port), "--disable-runtime-dependency-installation"]
        if p.certs is None:
            flower.append("--insecure")
        else:
            # checked by plan_server; certs is an absolute path (the SuperLink runs in Flower's home folder)
            flower += ["--ssl-certfile", str(p.certs / "server.pem"), "--ssl-keyfile", str(p.certs / "server.key"),
                       "--ssl-ca-certfile", str(p.certs / "ca.pem"), "--enable-supernode-auth"]
        public = f"[{p.host}]:{p.port}" if ":" in p.host else f"{p.host}:{p.port}"
        args = [sys.executable, "-m", "fedlora.server.superlink_gate", "--public", public, "--ready-file", str(self.home / GATE_READY),
                "--", *flower]
        log_path = self.logs / "superlink.log"
        out = log_pipe(log_path)  # the gate's lines and its children's (Flower's SuperExec), without colour codes
        try:
            self.gate = proc = spawn(args, self.env, stdout=out, cwd=self.home)
        finally:
            os.close(out)
        self.procs.append(proc)
        try:
            wait_for_port("127.0.0.1", self.control_port, 60, proc, lambda: tail(log_path))
        except DeploymentError as e:
            raise DeploymentError(f"the SuperLink did not start: {e}") from None

    def open_to_sites(self, registered: dict[int, str]) -> Path:
        """Write the ServerApp's Flower App, arm the gate with its FAB (the one StartRun it
        accepts) and open ``--address`` to the sites; returns the app folder for ``run``."""
        from flwr.cli.build import build_fab_from_disk

        p = self.plan
        app = self.home / "app"
        app.mkdir()
        (app / "pyproject.toml").write_text(flower_app_toml({
            "run-dir": str(p.run_dir.path.resolve()), "resume": p.resume, "min-sites": p.min_sites, "wait-timeout": float(p.wait_timeout),
            "registered": ",".join(f"{name}={node}" for node, name in sorted(registered.items())), "config": "", "out": "",
            "ca-pem": str(p.certs / "ca.pem") if p.certs is not None else ""}))
        fab_sha256 = hashlib.sha256(build_fab_from_disk(app)).hexdigest()  # what `flwr run app` builds (deterministic)
        write_text_atomic(self.home / GATE_READY, json.dumps({"fab_sha256": fab_sha256}))
        assert self.gate is not None
        log_path = self.logs / "superlink.log"
        try:
            wait_for_port(self.local, p.port, 60, self.gate, lambda: tail(log_path))
        except DeploymentError as e:
            raise DeploymentError(f"the SuperLink did not open {p.host}:{p.port} to the sites: {e}") from None
        security = "INSECURE: no TLS, no site authentication" if p.certs is None else "TLS, site authentication"
        self.say(f"SuperLink listening on {p.host}:{p.port} for the sites ({security}; Fleet API only); its Control and Runtime "
                 f"APIs on 127.0.0.1:{self.control_port} (this machine only; fedlora's own run only)")
        return app

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args], capture_output=True, text=True, env=self.env,
                              cwd=self.home, timeout=timeout)

    def register_sites(self) -> dict[int, str]:
        """Register every site public key of the certs folder over the loopback Control API (what
        ``flwr supernode register`` sends, from this process: one connection, no CLI start-up per
        key, so the sites wait less for ``open_to_sites``); node id -> site name."""
        import httpx
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.proto.control_pb2 import RegisterNodeRequest
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        assert self.plan.certs is not None
        keys = site_public_keys(self.plan.certs)  # not empty: plan_server checked
        client = ControlHttpClient.from_server_address(
            f"127.0.0.1:{self.control_port}", insecure=False, root_certificates=(self.plan.certs / "ca.pem").read_bytes(),
            interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
        registered: dict[int, str] = {}
        try:
            for name, pub in keys.items():
                try:
                    key = serialization.load_ssh_public_key(pub.read_bytes())
                    if not isinstance(key, ec.EllipticCurvePublicKey):
                        raise ValueError(f"not an EC public key ({type(key).__name__})")
                    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
                    node = int(client.RegisterNode(RegisterNodeRequest(public_key=pem, name=name)).node_id)
                except (OSError, ValueError, UnsupportedAlgorithm, httpx.HTTPError) as e:
                    detail = e.response.text[:500] if isinstance(e, httpx.HTTPStatusError) else str(e)
                    raise DeploymentError(f"registering {pub} with the SuperLink failed: {detail}") from None
                if not node:
                    raise DeploymentError(f"registering {pub} with the SuperLink failed: no node id came back")
                registered[node] = name
        finally:
            client.close()
        self.say(f"registered {len(registered)} site key(s): {', '.join(sorted(registered.values()))}")
        return registered

    def run(self, app: Path) -> None:
        """Submit the ServerApp (``open_to_sites``'s app) and stream its log until the run ends."""
        log_path = self.logs / "run.log"
        with log_path.open("a") as logf:
            proc = spawn(["flwr", "run", str(app), CONNECTION, "--stream"], self.env, stdout=subprocess.PIPE, cwd=self.home)
            self.procs.append(proc)
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(plain(line))
                logf.flush()
                if _worth_showing(line):
                    self.out.write(line)
                    self.out.flush()
            proc.wait()

    def say(self, text: str) -> None:
        self.out.write(f"fedlora server: {text}\n")
        self.out.flush()


def _worth_showing(line: str) -> bool:
    """The ServerApp's own lines and Flower's warnings and errors, not Flower's chatter."""
    return bool(line.strip()) and ("fedlora" in line or "round" in line.lower() or "WARN" in line or "ERROR" in line)


@contextmanager
def run_dir_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on the run directory itself while a ``fedlora
    server`` uses it; DeploymentError when another process holds it. The kernel drops the lock
    when its holder exits, however it exits: a stale lock cannot outlive a killed server."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeploymentError(f"{path} is in use by another fedlora server (a run directory serves one at a time)") from None
        yield
    finally:
        os.close(fd)


def failed_start(path: Path) -> bool:
    """Whether ``path`` is a run directory that a ``fedlora server`` start left without completing
    a round (so nothing to resume): only what a start writes (``START_LEFTOVERS``), config.toml
    among it, and no checkpoint."""
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    return "config.toml" in names and names <= START_LEFTOVERS


def clear_failed_start(path: Path) -> Path | None:
    """Empty a failed start's run directory (``failed_start``) for a retry, unless a live server
    holds it; its ``logs`` folder is moved aside, to a temporary folder beside it that is returned
    (``RunDir.start`` wants an empty folder: move it back afterwards)."""
    with run_dir_lock(path):
        error = path / "error.json"
        why = json.loads(error.read_text(encoding="utf-8")).get("error", "") if error.is_file() else ""
        log.warning("%s holds a start that completed no round%s; clearing it for this start (its logs are kept)", path,
                    f" ({why})" if why else "")
        kept = None
        if (path / "logs").is_dir():
            kept = path.parent / f".{path.name}.logs-{os.getpid()}"
            shutil.rmtree(kept, ignore_errors=True)
            os.replace(path / "logs", kept)
        for entry in path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return kept


def serve(plan: ServerPlan, out: IO[str] = sys.stdout) -> dict:
    """Run the coordinator to the end; returns the summary, or raises the run's error."""
    error_file = plan.run_dir.path / "error.json"
    error_file.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        with run_dir_lock(plan.run_dir.path), Deployment(plan, out) as d:
            d.start_superlink()
            registered = d.register_sites() if plan.certs is not None else {}
            app = d.open_to_sites(registered)
            d.say(f"waiting for {plan.min_sites} site(s) (at most {plan.wait_timeout:.0f} s), then {plan.cfg.train.rounds} round(s); "
                  f"run directory {plan.run_dir.path}")
            d.run(app)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM under processes.stop_signals (fedlora server): the same way out
        how = f"stopped by {e.signame}" if isinstance(e, Terminated) else "interrupted"
        raise RunInterrupted(f"{how}; the run directory keeps the last completed round. Continue with: "
                             f"fedlora server --resume {plan.run_dir.path} (with the same --address and --certs)") from None
    summary_path = plan.run_dir.path / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        log.info("run finished in %.1f s", time.monotonic() - started)
        return summary
    if error_file.is_file():
        err = json.loads(error_file.read_text(encoding="utf-8"))
        e = FedloraError(err["error"])
        e.exit_code = int(err.get("exit_code", 6))
        raise e
    raise FederationError(f"the run ended without completing; see {plan.run_dir.path / 'logs' / 'run.log'} "
                          f"(continue with fedlora server --resume {plan.run_dir.path})")


def plan_server(cfg: RunConfig | None, *, resume: str | None, address: str, certs: str | None, insecure: bool,
                min_sites: int | None, wait_timeout: float) -> ServerPlan:
    """Check everything, then create (or reopen) the run directory."""
    import torch

    from fedlora.model import LoraRuntime, ModelSpec

    from .app import deployment_labels
    from .secure_round import validate as validate_secure_aggregation

    host, port = parse_address(address, "--address")
    if insecure == (certs is not None):
        raise ConfigError("--certs", certs, "give --certs DIR (TLS and site authentication), or --insecure to run without both")
    certs_dir = coordinator_dir(certs).resolve() if certs else None  # DIR/coordinator when there, else DIR
    keys: dict[str, Path] = {}
    if certs_dir is not None:
        check_server_certs(certs_dir)
        if (certs_dir / "ca.key").exists():
            log.warning("%s holds ca.key: the coordinator does not need it and should never hold it (a folder of fedlora certs "
                        "--sites, for tests and demos; a real federation signs requests into DIR/coordinator)", certs_dir)
        if not (keys := site_public_keys(certs_dir)):
            raise ConfigError("--certs", str(certs_dir), "holds no <site>.pub: no site could join (fedlora certs --sites ...)")
    if resume:
        cfg, run_dir, _ = open_stopped_run(resume)
    assert cfg is not None
    deployment_labels(cfg)
    validate_secure_aggregation(cfg.secure_aggregation, {c.name: c.sites for c in cfg.cohorts})
    if wait_timeout <= 0:
        raise ConfigError("--wait-timeout", wait_timeout, "must be positive seconds")
    sites = int(min_sites) if min_sites else cfg.total_sites
    if sites < 1:
        raise ConfigError("--min-sites", min_sites, "must be at least 1")
    if certs_dir is not None and sites > len(keys):
        # only registered keys can join: waiting for more sites than that would only time out
        raise ConfigError("--min-sites" if min_sites else "cohorts", sites,
                          f"{'is' if min_sites else 'add up to'} more sites than the {len(keys)} site key(s) in {certs_dir} "
                          f"({', '.join(sorted(keys))}): only a registered site can join; add each missing site's <site>.pub "
                          f"(fedlora certs --sign-requests) or lower --min-sites")
    # the base model loads and has the LoRA targets; not kept (get_runtime would cache it in this process for
    # the whole run, while the model the run uses lives in the ServerApp's process)
    LoraRuntime(ModelSpec.from_config(cfg), torch.device("cpu"), torch.float32)
    if not resume:
        if not cfg.out:
            raise ConfigError("--out", None, "the run directory is required (fedlora server --out RUN_DIR)")
        kept_logs = clear_failed_start(Path(cfg.out)) if failed_start(Path(cfg.out)) else None
        try:
            run_dir = RunDir.start(cfg)
        finally:
            if kept_logs is not None:
                os.replace(kept_logs, Path(cfg.out) / "logs")
    return ServerPlan(cfg, run_dir, host, port, certs_dir, sites, wait_timeout, bool(resume))
