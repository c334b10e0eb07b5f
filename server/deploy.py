"""``fedlora server``: the coordinator of a real deployment, on Flower's Deployment Engine.

What it does, in order (nothing is started before everything is checked):

1. build and validate the run config (``--config`` plus flags), the model, the cohorts'
   labels, the TLS files; create the run directory and write ``config.toml`` (or, with
   ``--resume RUN_DIR``, read both back and check the checkpoint);
2. start a SuperLink on ``--address`` with TLS (``--certs DIR``, or ``DIR/coordinator`` when it
   exists: server.pem, server.key, ca.pem; never ca.key) and SuperNode authentication;
   register every ``<site>.pub`` of the certs folder (the allowlist) over the Control API,
   which gives each site its node id;
3. submit the fedlora ServerApp with ``flwr run`` (a Flower App written into
   ``RUN_DIR/.flower/app`` whose run config points at the run directory) and stream its log;
4. when the run ends, stop every process and remove ``RUN_DIR/.flower`` (Flower's home folder
   for this run: nothing is written outside the run directory).

The ServerApp waits for the sites (``--min-sites``, ``--wait-timeout``), trains, checkpoints
after every round and writes the run directory exactly as ``fedlora simulate`` does; it
records a failure in ``RUN_DIR/error.json``, which this process turns into its exit status.
Exit codes are the CLI's (0 done, 6 the federation failed, 9 deployment problems, 130
interrupted: resume with ``fedlora server --resume RUN_DIR``).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import tomli_w

from fedlora.config import RunConfig
from fedlora.errors import ConfigError, DeploymentError, FederationError, FedloraError, RunInterrupted
from fedlora.processes import flower_env, parse_address, spawn, stop, tail, wait_for_port

from .certs import check_server_certs, coordinator_dir, site_public_keys
from .checkpoint import open_stopped_run
from .rundir import RunDir

log = logging.getLogger("fedlora.server")

FLOWER_DIR = ".flower"  # Flower's home folder for this run, removed when the run ends
CONNECTION = "fedlora"  # the flwr CLI's name for this run's SuperLink


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
        # the coordinator talks to its own SuperLink over loopback (fedlora certs puts 127.0.0.1 in server.pem)
        self.local = "127.0.0.1" if plan.host in ("0.0.0.0", "::", "localhost", "127.0.0.1") else plan.host

    def __enter__(self) -> Deployment:
        shutil.rmtree(self.home, ignore_errors=True)  # a stale one from a killed run
        self.home.mkdir(parents=True)
        self.logs.mkdir(exist_ok=True)
        conn: dict[str, object] = {"address": f"{self.local}:{self.plan.port}"}
        conn.update({"insecure": True} if self.plan.certs is None else {"root-certificates": str(self.plan.certs / "ca.pem")})
        (self.home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))
        return self

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.procs):
            stop(p)
        shutil.rmtree(self.home, ignore_errors=True)

    def start_superlink(self) -> None:
        p = self.plan
        args = ["flower-superlink", "--host", p.host, "--port", str(p.port), "--disable-runtime-dependency-installation"]
        if p.certs is None:
            args.append("--insecure")
        else:
            # checked by plan_server; certs is an absolute path (the SuperLink runs in Flower's home folder)
            args += ["--ssl-certfile", str(p.certs / "server.pem"), "--ssl-keyfile", str(p.certs / "server.key"),
                     "--ssl-ca-certfile", str(p.certs / "ca.pem"), "--enable-supernode-auth"]
        log_path = self.logs / "superlink.log"
        proc = spawn(args, self.env, stdout=log_path.open("a"), cwd=self.home)
        self.procs.append(proc)
        wait_for_port(self.local, p.port, 60, proc, lambda: tail(log_path))
        self.say(f"SuperLink listening on {p.host}:{p.port} ({'INSECURE: no TLS, no site authentication' if p.certs is None else 'TLS, site authentication'})")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args], capture_output=True, text=True, env=self.env,
                              cwd=self.home, timeout=timeout)

    def register_sites(self) -> dict[int, str]:
        """Register every site public key of the certs folder; node id -> site name."""
        assert self.plan.certs is not None
        keys = site_public_keys(self.plan.certs)  # not empty: plan_server checked
        registered: dict[int, str] = {}
        for name, pub in keys.items():
            done = self.flwr("supernode", "register", str(pub.resolve()), CONNECTION, "--name", name, "--format", "json")
            try:
                registered[int(json.loads(done.stdout[done.stdout.index("{"):])["node-id"])] = name
            except (ValueError, KeyError):
                raise DeploymentError(f"registering {pub} with the SuperLink failed: {(done.stdout + done.stderr)[-1500:]}") from None
        self.say(f"registered {len(registered)} site key(s): {', '.join(sorted(registered.values()))}")
        return registered

    def run(self, registered: dict[int, str]) -> None:
        """Submit the ServerApp and stream its log until the run ends."""
        p = self.plan
        app = self.home / "app"
        app.mkdir()
        (app / "pyproject.toml").write_text(flower_app_toml({
            "run-dir": str(p.run_dir.path.resolve()), "resume": p.resume, "min-sites": p.min_sites, "wait-timeout": float(p.wait_timeout),
            "registered": ",".join(f"{name}={node}" for node, name in sorted(registered.items())), "config": "", "out": "",
            "ca-pem": str(p.certs / "ca.pem") if p.certs is not None else ""}))
        log_path = self.logs / "run.log"
        with log_path.open("a") as logf:
            proc = spawn(["flwr", "run", str(app), CONNECTION, "--stream"], self.env, stdout=subprocess.PIPE, cwd=self.home)
            self.procs.append(proc)
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
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


def serve(plan: ServerPlan, out: IO[str] = sys.stdout) -> dict:
    """Run the coordinator to the end; returns the summary, or raises the run's error."""
    error_file = plan.run_dir.path / "error.json"
    error_file.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        with Deployment(plan, out) as d:
            d.start_superlink()
            registered = d.register_sites() if plan.certs is not None else {}
            d.say(f"waiting for {plan.min_sites} site(s) (at most {plan.wait_timeout:.0f} s), then {plan.cfg.train.rounds} round(s); "
                  f"run directory {plan.run_dir.path}")
            d.run(registered)
    except KeyboardInterrupt:
        raise RunInterrupted(f"interrupted; the run directory keeps the last completed round. Continue with: "
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
    if certs_dir is not None:
        check_server_certs(certs_dir)
        if (certs_dir / "ca.key").exists():
            log.warning("%s holds ca.key: the coordinator does not need it and should never hold it (a folder of fedlora certs "
                        "--sites, for tests and demos; a real federation signs requests into DIR/coordinator)", certs_dir)
        if not site_public_keys(certs_dir):
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
    # the base model loads and has the LoRA targets; not kept (get_runtime would cache it in this process for
    # the whole run, while the model the run uses lives in the ServerApp's process)
    LoraRuntime(ModelSpec.from_config(cfg), torch.device("cpu"), torch.float32)
    if not resume:
        if not cfg.out:
            raise ConfigError("--out", None, "the run directory is required (fedlora server --out RUN_DIR)")
        run_dir = RunDir.start(cfg)
    return ServerPlan(cfg, run_dir, host, port, certs_dir, sites, wait_timeout, bool(resume))
