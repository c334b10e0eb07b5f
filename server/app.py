"""The fedlora ServerApp (Flower Message API).

``make_server_app`` serves the simulation engines (config, run directory and labels in hand).
``app`` is the deployment entry point (``flwr run`` against a SuperLink, by ``fedlora server``
or by hand): it reads its run config keys ``run-dir`` + ``resume`` (``fedlora server``) or
``config`` (path of a RUN.toml, optional) + ``out`` (a new run directory), ``min-sites``
(sites to wait for; default: the config's total), ``wait-timeout`` (seconds), ``registered``
(``name=node_id,...``: the sites are named by their keys), ``ca-pem`` (path of the federation CA: each site is then
named by its certificate, checked against it), and each cohort's labels from the config (``cohorts.<name>.labels``; the demo cohorts' own
labels when absent), since the coordinator holds no data.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import DEMO_LABELS, RunConfig, apply_overrides, config_from_dict, load_config
from fedlora.errors import ConfigError, FedloraError
from fedlora.tasks import get_task

from .checkpoint import Checkpoint
from .coordinator import Coordinator
from .exchange import with_timeouts
from .rundir import RunDir


def make_server_app(cfg: RunConfig, run_dir: RunDir, labels: dict[str, list[str]], *, expected_sites: int,
                    progress: bool = True, result: dict | None = None, resume: Checkpoint | None = None, ca_pem: str = "") -> ServerApp:
    """A ServerApp that runs the coordinator on whatever Grid the engine provides.

    ``result`` (optional) receives the run's summary, for callers in the same process;
    ``resume`` continues from a checkpoint; ``ca_pem`` (the federation CA) makes the coordinator
    name each site by its certificate.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        summary = Coordinator(cfg, run_dir, labels, expected_sites=expected_sites, progress=progress, resume=resume,
                              ca_pem=ca_pem).run(with_timeouts(grid, cfg.federation))
        if result is not None:
            result.update(summary)

    return app


def deployment_labels(cfg: RunConfig) -> dict[str, list[str]]:
    """Each cohort's label list from the config alone (the coordinator never sees the data)."""
    out = {}
    for c in cfg.cohorts:
        if c.labels:
            out[c.name] = list(c.labels)
        elif c.name in DEMO_LABELS and not c.data:
            out[c.name] = list(DEMO_LABELS[c.name])
        elif not get_task(cfg.task.kind).labels_required:
            out[c.name] = []  # instruction data without classes; label-answer sites then refuse, naming the missing list
        else:
            raise ConfigError(f"cohorts.{c.name}.labels", [], "must be listed in deployment: the coordinator holds no data to read them from")
    return out


def _open_run(rc: dict) -> tuple[RunConfig, RunDir, Checkpoint | None]:
    """``run-dir`` (made by ``fedlora server``, its config.toml inside; ``resume`` continues
    from its checkpoint) or ``out`` + ``config`` (``flwr run .`` by hand: a new run directory)."""
    if rc.get("run-dir"):
        run_dir = RunDir(Path(str(rc["run-dir"])))
        cfg = config_from_dict(load_config(run_dir.path / "config.toml"))
        return cfg, run_dir, Checkpoint.load(run_dir.path) if rc.get("resume") else None
    if not rc.get("out"):
        raise ConfigError("run config out", rc.get("out"), "the run directory is required (flwr run . --run-config 'out=\"PATH\"')")
    cfg = config_from_dict(apply_overrides(load_config(str(rc["config"]) if rc.get("config") else None), {"out": str(rc["out"])}))
    return cfg, RunDir.start(cfg), None


def parse_registered(text: str) -> dict[int, str]:
    """``name=node_id,...`` (the sites ``fedlora server`` registered) -> node id -> name."""
    out = {}
    for item in filter(None, text.split(",")):
        name, _, node = item.partition("=")
        out[int(node)] = name
    return out


app = ServerApp()


@app.main()
def deployed(grid: Grid, context: Context) -> None:
    """The deployment ServerApp; a fedlora error is also written to ``RUN_DIR/error.json``
    (``fedlora server`` reads it back as its exit status)."""
    logger = logging.getLogger("fedlora")
    if not logger.handlers:  # the ServerApp's process: its stdout is streamed to `flwr run` (fedlora server's console)
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s fedlora %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    rc = dict(context.run_config)
    cfg, run_dir, resume = _open_run(rc)
    try:
        labels = deployment_labels(cfg)
        expected = int(rc.get("min-sites") or cfg.total_sites)
        registered = parse_registered(str(rc.get("registered", "")))
        Coordinator(cfg, run_dir, labels, expected_sites=expected, progress=False, wait_timeout=float(rc.get("wait-timeout") or 120.0),
                    resume=resume, registered=registered,
                    ca_pem=Path(str(rc["ca-pem"])).read_text(encoding="utf-8") if rc.get("ca-pem") else "",
                    engine="deployment").run(with_timeouts(grid, cfg.federation, registered))  # a site that does not answer is left out
    except FedloraError as e:
        run_dir.write_json("error.json", {"error": str(e), "exit_code": e.exit_code})
        print(f"fedlora: error: {e}", flush=True)
        raise
