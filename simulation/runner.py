"""``fedlora simulate``: plan the sites, validate everything, then run the federation.

Order of work, so that bad input writes nothing: validate the config (done when it was
built), load the base model and check the LoRA targets, read and validate every real data
file and every site's share of it (``partition``: computed once here, at the coordinator side,
seeded by the run's seed and the cohort name); only then create the run directory, write the
demo data and ``partition.json`` (every site's rows and label histogram), and start the engine.

With secure aggregation the run makes an in-memory federation CA (``key_signing.InMemoryCA``)
and gives every virtual site its own key, certificate and the CA (``with_credentials``), so the
sites sign their SecAgg keys and check their peers' exactly as deployed sites do.

A large population (more than ``LAZY_FROM`` sites on the in-process engine; cross-device runs with
``federation.site_sample_rate`` of a few per cent) is lazy (``Population``): nothing per site exists
before the site is first sent a message. Its demo sites' rows are generated in memory from (seed,
cohort, site) when the site first trains or evaluates (``demo_data.generated_path``; nothing is
written to ``demo_data/``), a site's key and certificate are issued then, its tokenised data is kept
for a bounded number of sites (``fedlora.client.app.DATA_CACHE_SITES``), the engine names the sites
from its node table instead of asking each at discovery (``LocalGrid.roster``), and
``partition.json`` describes the demo cohorts instead of listing every site's label histogram.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.client.app import make_client_app
from fedlora.client.data import read_group_column, split_train_eval
from fedlora.tasks import SiteColumns, get_task
from fedlora.client.site import SiteSpec
from fedlora.config import RunConfig
from fedlora.errors import ConfigError, FederationError, RunInterrupted
from fedlora.model import ModelSpec, derive_seed, get_runtime
from fedlora.privacy.key_signing import InMemoryCA
from fedlora.privacy.policy import SitePolicy
from fedlora.server.advice import with_warnings
from fedlora.server.app import make_server_app
from fedlora.server.checkpoint import Checkpoint, open_stopped_run
from fedlora.server.rundir import RunDir, default_run_dir
from fedlora.server.secure_round import too_small
from fedlora.server.secure_round import validate as validate_secure_aggregation
from fedlora.server.run_summary import all_skipped_message

from . import demo_data, site_metrics
from .local_grid import LocalGrid
from .partition import partition_rows

log = logging.getLogger("fedlora.simulation")
LAZY_FROM = 500  # sites: a larger population on the in-process engine is lazy (``Population``)


class Population(Sequence[SiteSpec]):
    """Every virtual site of a run by partition id (the cohorts in config order, each in site
    order), each ``SiteSpec`` made when it is first asked for and the last ``KEPT`` kept. A cohort
    of a data file has its planned sites (``fixed``: rows and policy decided by ``plan_sites``); a
    demo cohort only its number of sites, named ``<cohort>-<k>``. ``in_run`` gives the population
    a lazy run uses: demo rows named by ``demo_data.generated_path``, state directories under the
    run's ``site_state``; ``with_ca`` issues each site its key and certificate the first time it is
    asked for, kept for the run (a secure sum checks a site's signatures at several stages)."""

    KEPT = 4096

    def __init__(self, cfg: RunConfig, blocks: Sequence[tuple[str, int, tuple[SiteSpec, ...] | None]], *,
                 generated: bool = False, state_root: Path | None = None, ca: InMemoryCA | None = None) -> None:
        self.cfg, self.blocks = cfg, tuple(blocks)
        self.generated, self.state_root, self.ca = generated, state_root, ca
        self._starts = list(itertools.accumulate((n for _, n, _ in self.blocks), initial=0))
        self._made: OrderedDict[int, SiteSpec] = OrderedDict()
        self._credentials: dict[str, dict[str, str]] = {}

    def in_run(self, run_dir: RunDir) -> Population:
        """This population as a lazy run uses it (see the class)."""
        return Population(self.cfg, self.blocks, generated=True, state_root=(run_dir.path / "site_state").resolve(), ca=self.ca)

    def with_ca(self, ca: InMemoryCA) -> Population:
        """This population, each site given a fresh key and a certificate from ``ca`` when first asked for."""
        return Population(self.cfg, self.blocks, generated=self.generated, state_root=self.state_root, ca=ca)

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> SiteSpec:  # type: ignore[override]
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"partition id {i} of a population of {len(self)} sites")
        spec = self._made.get(i)
        if spec is None:
            spec = self._made[i] = self._make(i)
            while len(self._made) > self.KEPT:
                self._made.popitem(last=False)
        else:
            self._made.move_to_end(i)
        return spec

    def __iter__(self) -> Iterator[SiteSpec]:
        return (self[i] for i in range(len(self)))

    def _where(self, i: int) -> tuple[str, int, int, tuple[SiteSpec, ...] | None]:
        """(cohort, index in the cohort, the cohort's number of sites, its planned sites) of partition id ``i``."""
        b = bisect.bisect_right(self._starts, i) - 1
        cohort, n, fixed = self.blocks[b]
        return cohort, i - self._starts[b], n, fixed

    def name_of(self, i: int) -> tuple[str, str]:
        """(site name, cohort) of partition id ``i``, without making its ``SiteSpec``."""
        cohort, k, _, fixed = self._where(i)
        return (fixed[k].name if fixed is not None else f"{cohort}-{k + 1}"), cohort

    def names(self) -> list[tuple[str, str]]:
        """(site name, cohort) by partition id (the engine's node table: ``LocalGrid.roster``)."""
        return [self.name_of(i) for i in range(len(self))]

    def has_site(self, name: str) -> bool:
        for cohort, n, fixed in self.blocks:
            if fixed is not None and any(s.name == name for s in fixed):
                return True
            k = name.removeprefix(f"{cohort}-")
            if fixed is None and k != name and k.isdigit() and str(int(k)) == k and 1 <= int(k) <= n:
                return True
        return False

    def state_dirs(self) -> list[str]:
        """The state directories sites of a lazy run made (those that worked and kept something)."""
        if self.state_root is None or not self.state_root.is_dir():
            return []
        return [str(p) for p in sorted(self.state_root.iterdir()) if p.is_dir()]

    def _make(self, i: int) -> SiteSpec:
        cohort, k, n, fixed = self._where(i)
        if fixed is not None:
            spec = fixed[k]
        else:
            name, d = f"{cohort}-{k + 1}", self.cfg.demo
            path = demo_data.generated_path(cohort, k, n, seed=self.cfg.seed, examples_per_site=d.examples_per_site,
                                            size_skew=d.size_skew, label_skew=d.label_skew) if self.generated else ""
            spec = _planned(self.cfg, SiteSpec(name, cohort, path))
        if self.state_root is not None:
            spec = replace(spec, state_dir=str(self.state_root / spec.name))
        if self.ca is not None:
            if spec.name not in self._credentials:
                c = self.ca.credentials(spec.name)
                self._credentials[spec.name] = {"signing_key": c.signing_key, "certificate": c.certificate, "ca": c.ca}
            spec = replace(spec, **self._credentials[spec.name])
        return spec


def is_lazy(cfg: RunConfig, n_sites: int) -> bool:
    """Whether a run of ``n_sites`` virtual sites is a lazy population (``Population``)."""
    return cfg.federation.engine == "inprocess" and n_sites > LAZY_FROM


@dataclass(frozen=True)
class Plan:
    sites: Population  # by partition id
    labels: dict[str, list[str]]  # cohort -> label list
    demo_cohorts: list[str]  # cohorts whose data is generated into the run directory
    cfg: RunConfig  # the config the run uses: under partition.kind = "column" a cohort's `sites` is its number of values
    groups: dict[str, str] | None = None  # site -> its value of partition.by (kind "column")


def plan_sites(cfg: RunConfig) -> Plan:
    """Decide every site's data and every cohort's labels; reads (never writes) real data files.
    A cohort's file is split by ``cfg.partition`` (``fedlora.simulation.partition``), once, seeded
    by ``(cfg.seed, cohort name)``; each site gets its row indices (``SiteSpec.rows``). A demo
    cohort's sites are made when first asked for (``Population``)."""
    blocks: list[tuple[str, int, tuple[SiteSpec, ...] | None]] = []
    labels: dict[str, list[str]] = {}
    demo: list[str] = []
    groups: dict[str, str] = {}
    counts: dict[str, int] = {}
    part_cfg = cfg.partition
    task = get_task(cfg.task.kind)
    for c in cfg.cohorts:
        if c.data:
            columns = SiteColumns(c.text_column, c.label_column, c.prompt_column, c.response_column, c.messages_column)
            data, label_list = task.read(c.data, columns, c.labels or None)
            if not label_list and part_cfg.kind in ("dirichlet", "pathological"):
                raise ConfigError("partition.kind", part_cfg.kind, f"splits by class, but cohort {c.name}'s data ({c.data}) has "
                                  "prompts and responses, no classes; use iid, size or column")
            values = read_group_column(c.data, part_cfg.by) if part_cfg.kind == "column" else None
            parts = partition_rows(data.labels, c.sites, part_cfg, derive_seed(cfg.seed, "partition", c.name), groups=values,
                                   where=f"cohort {c.name} ({c.data})")
            planned = []
            for i, rows in enumerate(parts):
                name = f"{c.name}-{i + 1}"
                split_train_eval(data.subset(rows), cfg.train.eval_fraction, cfg.seed, name)
                planned.append(SiteSpec(name, c.name, str(Path(c.data).resolve()), c.text_column, c.label_column, c.prompt_column,
                                        c.response_column, c.messages_column, tuple(rows.tolist())))
                if values is not None:
                    groups[name] = values[int(rows[0])]
            blocks.append((c.name, len(parts), tuple(planned)))
            counts[c.name] = len(parts)
            labels[c.name] = label_list
        else:
            demo_labels = demo_data.LABELS[c.name]
            if c.labels and sorted(c.labels) != sorted(demo_labels):
                raise ConfigError(f"cohorts.{c.name}.labels", list(c.labels), f"the demo data of {c.name} has labels {demo_labels}")
            labels[c.name] = list(c.labels) if c.labels else demo_labels
            demo.append(c.name)
            blocks.append((c.name, c.sites, None))
    cfg = _with_site_counts(cfg, counts)
    sizes = {c.name: c.sites for c in cfg.cohorts}
    validate_secure_aggregation(cfg.secure_aggregation, sizes)
    skipped = too_small(cfg.secure_aggregation, sizes)
    if skipped and len(skipped) == len(sizes):  # nothing would train: refused before anything is written
        raise FederationError(all_skipped_message(skipped))
    sites = Population(cfg, [(name, n, None if fixed is None else tuple(_planned(cfg, s) for s in fixed)) for name, n, fixed in blocks])
    shown = ", ".join(sites.name_of(i)[0] for i in range(min(12, len(sites))))
    budgets = cfg.privacy.budgets
    unknown = sorted(b for b in budgets if not sites.has_site(b))
    if unknown:
        raise ConfigError(f"privacy.budgets.{unknown[0]}", budgets[unknown[0]], f"no such site; sites: {shown}")
    ranks = cfg.lora.site_ranks  # [lora.site_ranks]: the rank each named site trains (its own, never in a round message)
    unknown = sorted(r for r in ranks if not sites.has_site(r))
    if unknown:
        raise ConfigError(f"lora.site_ranks.{unknown[0]}", ranks[unknown[0]], f"no such site; sites: {shown}")
    return Plan(sites, labels, demo, cfg, groups or None)


def _planned(cfg: RunConfig, site: SiteSpec) -> SiteSpec:
    """A planned site with what the run's config says of it: its privacy policy and its LoRA rank (``lora.site_ranks``)."""
    return replace(site, policy=site_policy(cfg, site.name), lora_rank=cfg.lora.site_ranks.get(site.name, 0))


def _with_site_counts(cfg: RunConfig, counts: dict[str, int]) -> RunConfig:
    """``cfg`` with each cohort's ``sites`` set to the number its partition made (changes only under
    partition.kind = "column", where the cohort has one site per distinct value); a new, validated config."""
    changed = {name: n for name, n in counts.items() if cfg.cohort(name).sites != n}
    if not changed:
        return cfg
    for name, n in changed.items():
        if n > 10_000:
            raise ConfigError("partition.by", cfg.partition.by, f"cohort {name}'s column has {n} distinct values; at most 10000 sites per cohort")
        log.info("cohort %s: partition.by %r has %d distinct values, so the cohort has %d sites (cohorts.%s.sites was %d)",
                 name, cfg.partition.by, n, n, name, cfg.cohort(name).sites)
    return replace(cfg, cohorts=tuple(replace(c, sites=changed.get(c.name, c.sites)) for c in cfg.cohorts))


def site_policy(cfg: RunConfig, site: str) -> SitePolicy:
    """A virtual site's own privacy policy, from the run's ``[privacy]`` section: the budget it
    requires (``privacy.budgets`` or ``privacy.epsilon`` when DP is on), its largest delta, its
    accountant, what it does with eval metrics, the research switch for seeded noise, and whether
    it requires secure aggregation (``[secure_aggregation]`` on and ``allow_clear`` off: the
    researcher owns every simulated site)."""
    p = cfg.privacy
    return SitePolicy(epsilon=p.budget_for(site) if p.site_requires_dp(site) else 0.0, max_delta=float(p.delta),
                      accountant=p.accountant, eval_metrics=p.eval_metrics, eval_budget_fraction=float(p.eval_budget_fraction),
                      reproducible_noise=p.reproducible_noise, require_secure_aggregation=cfg.secure_aggregation.sites_require_it)


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


def sites_table(cfg: RunConfig, plan: Plan, sites: list[SiteSpec]) -> dict[str, Any]:
    """What ``partition.json`` holds (the coordinator's own ``sites.json`` lists cohort -> site names):
    the partition scheme and, for every site, its name, cohort, data file, number of rows and label
    histogram (label -> count, every label of the cohort); a site of a real data file also its row
    indices (0-based data rows) and, under partition.kind = "column", its value of the column. Demo sites hold one generated file each (no row indices).
    A simulation artefact: the harness made the split and holds every file anyway."""
    out = []
    for s in sites:
        labels = plan.labels[s.cohort]
        data, _ = get_task(cfg.task.kind).read(s.data_path, s.columns, labels or None)
        demo = s.cohort in plan.demo_cohorts
        ids = data.labels if demo or not s.rows else data.labels[list(s.rows)]
        hist = np.bincount(ids, minlength=len(labels)) if labels else []
        entry: dict[str, Any] = {"name": s.name, "cohort": s.cohort, "data": s.data_path, "num_rows": int(len(ids)),
                                 "labels": {lab: int(n) for lab, n in zip(labels, hist)},
                                 "partition": "demo" if demo else cfg.partition.kind}
        if not demo:
            entry["rows"] = list(s.rows) if s.rows else list(range(len(data)))
        if plan.groups and s.name in plan.groups:
            entry["group"] = plan.groups[s.name]  # its value of the partition.by column
        out.append(entry)
    return {"partition": cfg.partition.describe(), "sites": out}


def lazy_sites_table(cfg: RunConfig, plan: Plan) -> dict[str, Any]:
    """``partition.json`` of a lazy population: the sites of data files as ``sites_table`` lists
    them, and each demo cohort described, not listed (``generated``: its number of sites, the rows
    of its first and last site, and how its rows are made; no label histograms, which would mean
    generating every site's rows)."""
    fixed = [s for _, _, sites in plan.sites.blocks if sites is not None for s in sites]
    table = sites_table(cfg, plan, fixed)
    d = cfg.demo
    table["generated"] = [{"cohort": name, "sites": n, "partition": "demo",
                           "rows": "generated in memory from (seed, cohort, site index) when the site first trains or evaluates; not written",
                           "num_rows": {"first_site": demo_data.site_size(0, n, d.examples_per_site, d.size_skew),
                                        "last_site": demo_data.site_size(n - 1, n, d.examples_per_site, d.size_skew)}}
                          for name, n, sites in plan.sites.blocks if sites is None]
    return table


def ray_init_args(cfg: RunConfig, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """``ray.init``'s arguments: a running Ray cluster's address (``federation.ray_address``, else
    ``RAY_ADDRESS``; the cluster brings its own CPUs, on this machine or several), else a local
    Ray with this machine's CPUs."""
    address = cfg.federation.ray_address or environ.get("RAY_ADDRESS", "")
    return {"address": address, "include_dashboard": False} if address else {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}


def run_engine(cfg: RunConfig, sites: Sequence[SiteSpec], server_app: Any, client_app: Any) -> None:
    """Run the apps on the configured engine (in-process Grid, or Flower's Ray Simulation Engine).
    A lazy population's grid names its nodes from the population (``LocalGrid.roster``)."""
    if cfg.federation.engine == "inprocess":
        from flwr.app import Context, RecordDict

        roster = sites.names() if isinstance(sites, Population) and sites.generated else None
        server_app(LocalGrid(client_app, len(sites), roster=roster), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                                              run_config={}))
        return
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    backend = {"client_resources": {"num_cpus": cfg.federation.ray_cpus_per_site, "num_gpus": 0.0}, "init_args": ray_init_args(cfg)}
    if "address" in backend["init_args"]:
        log.info("Ray engine: connecting to the Ray cluster at %s", backend["init_args"]["address"])
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(sites), backend_config=backend)


def simulate(cfg: RunConfig, *, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Run a local federation; returns the run directory and its summary."""
    started = time.perf_counter()
    get_runtime(ModelSpec.from_config(cfg), cfg.model.device, cfg.model.dtype)  # loads the model, checks LoRA targets
    plan = plan_sites(cfg)
    cfg = plan.cfg  # partition.kind = "column": one site per distinct value (logged by plan_sites)
    run_dir = RunDir.start(cfg if cfg.out else replace(cfg, out=str(default_run_dir())))
    sites: Sequence[SiteSpec]
    if is_lazy(cfg, len(plan.sites)):
        sites = plan.sites.in_run(run_dir)
        run_dir.write_json("partition.json", lazy_sites_table(cfg, plan))
    else:
        sites = _write_demo_data(cfg, plan, run_dir)
        run_dir.write_json("partition.json", sites_table(cfg, plan, sites))
    return _run(cfg, plan, run_dir, sites, None, progress, started)


def resume(run_path: str | Path, *, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Continue a stopped simulation from its last checkpoint, with the config it started with.
    The result equals that of a run that never stopped (same adapters, metrics, epsilon)."""
    started = time.perf_counter()
    cfg, run_dir, checkpoint = open_stopped_run(run_path)
    get_runtime(ModelSpec.from_config(cfg), cfg.model.device, cfg.model.dtype)
    plan = plan_sites(cfg)
    moved = [c.name for c in cfg.cohorts if plan.cfg.cohort(c.name).sites != c.sites]
    if moved:
        raise FederationError(f"cannot resume {run_dir.path}: cohort {moved[0]} started with {cfg.cohort(moved[0]).sites} sites, but "
                              f"its data file now has {plan.cfg.cohort(moved[0]).sites} distinct values of {cfg.partition.by!r}")
    lazy = is_lazy(cfg, len(plan.sites))  # partition.json stays as the run wrote it
    sites = plan.sites.in_run(run_dir) if lazy else _write_demo_data(cfg, plan, run_dir, write=False)
    return _run(cfg, plan, run_dir, sites, checkpoint, progress, started)


def with_credentials(sites: Sequence[SiteSpec], ca: InMemoryCA | None = None) -> list[SiteSpec]:
    """The sites, each with a fresh P-256 key, a certificate for its name from ``ca`` (a new
    in-memory CA for this run if None; its key never leaves this process) and the CA itself.
    (A lazy population issues them when a site is first asked for: ``Population.with_ca``.)"""
    ca = ca or InMemoryCA()
    out = []
    for s in sites:
        creds = ca.credentials(s.name)
        out.append(replace(s, signing_key=creds.signing_key, certificate=creds.certificate, ca=creds.ca))
    return out


def _run(cfg: RunConfig, plan: Plan, run_dir: RunDir, sites: Sequence[SiteSpec], checkpoint: Checkpoint | None, progress: bool,
         started: float) -> tuple[Path, dict[str, Any]]:
    result: dict[str, Any] = {}
    ca = InMemoryCA() if cfg.secure_aggregation.enabled else None
    if ca is not None:
        sites = sites.with_ca(ca) if isinstance(sites, Population) else with_credentials(sites, ca)
    server_app = make_server_app(cfg, run_dir, plan.labels, expected_sites=len(sites), progress=progress, result=result,
                                 resume=checkpoint, ca_pem=ca.pem if ca is not None else "")
    client_app = make_client_app(sites, device=cfg.model.device, dtype=cfg.model.dtype)
    try:
        run_engine(cfg, sites, server_app, client_app)
    except KeyboardInterrupt:
        raise RunInterrupted(f"interrupted; the run directory keeps the last completed round. Continue with: "
                             f"fedlora simulate --resume {run_dir.path}") from None
    if not result:
        raise FederationError(f"the {cfg.federation.engine} engine finished without completing the run; see the log above "
                              f"(partial results in {run_dir.path})")
    kept = site_metrics.read_kept(sites.state_dirs() if isinstance(sites, Population) else (s.state_dir for s in sites if s.state_dir))
    if kept:  # DP sites kept their eval metrics: the harness (which runs every site) reads them back
        result = with_warnings(site_metrics.fill_summary(result, kept, get_task(cfg.task.kind)), dp=True)
        run_dir.write_json("summary.json", result)
    log.info("run finished in %.1f s: %s", time.perf_counter() - started, run_dir.path)
    return run_dir.path, result
