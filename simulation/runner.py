"""``fedlora simulate``: plan the sites, validate everything, then run the federation.

Order of work, so that bad input writes nothing: validate the config (done when it was
built), load the base model and check the LoRA targets, read and validate every real data
file and every site's share of it; only then create the run directory, write the demo data,
and start the engine.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedlora.client.app import make_client_app
from fedlora.client.data import load_labelled_texts, shard, split_train_eval
from fedlora.client.site import SiteSpec
from fedlora.config import RunConfig
from fedlora.errors import ConfigError, FederationError, RunInterrupted
from fedlora.model import ModelSpec, get_runtime
from fedlora.privacy.policy import SitePolicy
from fedlora.server.app import make_server_app
from fedlora.server.checkpoint import Checkpoint, open_stopped_run
from fedlora.server.rundir import RunDir, default_run_dir
from fedlora.server.secure_round import validate as validate_secure_aggregation

from . import demo_data, site_metrics
from .local_grid import LocalGrid

log = logging.getLogger("fedlora.simulation")


@dataclass(frozen=True)
class Plan:
    sites: list[SiteSpec]  # by partition id
    labels: dict[str, list[str]]  # cohort -> label list
    demo_cohorts: list[str]  # cohorts whose data is generated into the run directory


def plan_sites(cfg: RunConfig) -> Plan:
    """Decide every site's data and every cohort's labels; reads (never writes) real data files."""
    sites: list[SiteSpec] = []
    labels: dict[str, list[str]] = {}
    demo: list[str] = []
    for c in cfg.cohorts:
        if c.data:
            data, label_list = load_labelled_texts(c.data, c.text_column, c.label_column, c.labels or None)
            for i in range(c.sites):
                part = shard(data, i, c.sites, cfg.seed, f"{c.name}:{c.data}") if c.sites > 1 else data
                split_train_eval(part, cfg.train.eval_fraction, cfg.seed, f"{c.name}-{i + 1}")
                sites.append(SiteSpec(f"{c.name}-{i + 1}", c.name, str(Path(c.data).resolve()), c.text_column, c.label_column, i, c.sites))
            labels[c.name] = label_list
        else:
            demo_labels = demo_data.LABELS[c.name]
            if c.labels and sorted(c.labels) != sorted(demo_labels):
                raise ConfigError(f"cohorts.{c.name}.labels", list(c.labels), f"the demo data of {c.name} has labels {demo_labels}")
            labels[c.name] = list(c.labels) if c.labels else demo_labels
            demo.append(c.name)
            sites.extend(SiteSpec(f"{c.name}-{i + 1}", c.name, "") for i in range(c.sites))
    validate_secure_aggregation(cfg.secure_aggregation, {c.name: c.sites for c in cfg.cohorts})
    budgets = cfg.privacy.budgets
    unknown = sorted(set(budgets) - {s.name for s in sites})
    if unknown:
        raise ConfigError(f"privacy.budgets.{unknown[0]}", budgets[unknown[0]], f"no such site; sites: {', '.join(s.name for s in sites[:12])}")
    sites = [replace(s, policy=site_policy(cfg, s.name)) for s in sites]
    return Plan(sites, labels, demo)


def site_policy(cfg: RunConfig, site: str) -> SitePolicy:
    """A virtual site's own privacy policy, from the run's ``[privacy]`` section: the budget it
    requires (``privacy.budgets`` or ``privacy.epsilon`` when DP is on), its largest delta, its
    accountant, what it does with eval metrics, and the research switch for seeded noise."""
    p = cfg.privacy
    return SitePolicy(epsilon=p.budget_for(site) if p.site_requires_dp(site) else 0.0, max_delta=float(p.delta),
                      accountant=p.accountant, eval_metrics=p.eval_metrics, eval_budget_fraction=float(p.eval_budget_fraction),
                      reproducible_noise=p.reproducible_noise)


def _write_demo_data(cfg: RunConfig, plan: Plan, run_dir: RunDir, *, write: bool = True) -> list[SiteSpec]:
    """The sites with their data paths (the demo cohorts' files generated into the run
    directory; ``write=False`` reuses them on resume) and their state directories."""
    paths: dict[str, str] = {}
    for name in plan.demo_cohorts:
        c = cfg.cohort(name)
        if write:
            files = demo_data.write_cohort(run_dir.path / "demo_data", name, c.sites, seed=cfg.seed, examples_per_site=cfg.demo.examples_per_site,
                                           size_skew=cfg.demo.size_skew, label_skew=cfg.demo.label_skew)
        else:
            files = sorted((run_dir.path / "demo_data").glob(f"{name}-*.synthetic.csv"))
        for p in files:
            paths[p.name.removesuffix(".synthetic.csv")] = str(p.resolve())
    missing = [s.name for s in plan.sites if not s.data_path and s.name not in paths]
    if missing:
        raise FederationError(f"the demo data of site(s) {', '.join(missing)} is missing from {run_dir.path / 'demo_data'}")
    return [replace(s, data_path=s.data_path or paths[s.name], state_dir=str((run_dir.path / "site_state" / s.name).resolve()))
            for s in plan.sites]


def run_engine(cfg: RunConfig, sites: list[SiteSpec], server_app: Any, client_app: Any) -> None:
    """Run the apps on the configured engine (in-process Grid, or Flower's Ray Simulation Engine)."""
    if cfg.federation.engine == "inprocess":
        from flwr.app import Context, RecordDict

        server_app(LocalGrid(client_app, len(sites)), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
        return
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    backend = {"client_resources": {"num_cpus": cfg.federation.ray_cpus_per_site, "num_gpus": 0.0},
               "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(sites), backend_config=backend)


def simulate(cfg: RunConfig, *, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Run a local federation; returns the run directory and its summary."""
    started = time.perf_counter()
    get_runtime(ModelSpec.from_config(cfg), cfg.model.device, cfg.model.dtype)  # loads the model, checks LoRA targets
    plan = plan_sites(cfg)
    run_dir = RunDir.start(cfg if cfg.out else replace(cfg, out=str(default_run_dir())))
    sites = _write_demo_data(cfg, plan, run_dir)
    return _run(cfg, plan, run_dir, sites, None, progress, started)


def resume(run_path: str | Path, *, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Continue a stopped simulation from its last checkpoint, with the config it started with.
    The result equals that of a run that never stopped (same adapters, metrics, epsilon)."""
    started = time.perf_counter()
    cfg, run_dir, checkpoint = open_stopped_run(run_path)
    get_runtime(ModelSpec.from_config(cfg), cfg.model.device, cfg.model.dtype)
    plan = plan_sites(cfg)
    sites = _write_demo_data(cfg, plan, run_dir, write=False)
    return _run(cfg, plan, run_dir, sites, checkpoint, progress, started)


def _run(cfg: RunConfig, plan: Plan, run_dir: RunDir, sites: list[SiteSpec], checkpoint: Checkpoint | None, progress: bool,
         started: float) -> tuple[Path, dict[str, Any]]:
    result: dict[str, Any] = {}
    server_app = make_server_app(cfg, run_dir, plan.labels, expected_sites=len(sites), progress=progress, result=result,
                                 resume=checkpoint)
    client_app = make_client_app(sites, device=cfg.model.device, dtype=cfg.model.dtype)
    try:
        run_engine(cfg, sites, server_app, client_app)
    except KeyboardInterrupt:
        raise RunInterrupted(f"interrupted; the run directory keeps the last completed round. Continue with: "
                             f"fedlora simulate --resume {run_dir.path}") from None
    if not result:
        raise FederationError(f"the {cfg.federation.engine} engine finished without completing the run; see the log above "
                              f"(partial results in {run_dir.path})")
    kept = site_metrics.read_kept(s.state_dir for s in sites if s.state_dir)
    if kept:  # DP sites kept their eval metrics: the harness (which runs every site) reads them back
        result = site_metrics.fill_summary(result, kept)
        run_dir.write_json("summary.json", result)
    log.info("run finished in %.1f s: %s", time.perf_counter() - started, run_dir.path)
    return run_dir.path, result
