"""The fedlora ServerApp (Flower Message API).

``make_server_app`` serves the simulation engines (config, run directory and labels in hand).
``app`` is the deployment entry point (``flwr run`` against a SuperLink): it reads its run
config keys ``config`` (path of a RUN.toml, optional), ``out`` (the run directory, required),
``min-sites`` (sites to wait for; default: the config's total) and ``wait-timeout`` (seconds),
and each cohort's labels from the config (``cohorts.<name>.labels``; the demo cohorts' own
labels when absent), since the coordinator holds no data.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import RunConfig, apply_overrides, config_from_dict, load_config
from fedlora.errors import ConfigError

from .checkpoint import Checkpoint
from .coordinator import Coordinator
from .rundir import RunDir


def make_server_app(cfg: RunConfig, run_dir: RunDir, labels: dict[str, list[str]], *, expected_sites: int,
                    progress: bool = True, result: dict | None = None, resume: Checkpoint | None = None) -> ServerApp:
    """A ServerApp that runs the coordinator on whatever Grid the engine provides.

    ``result`` (optional) receives the run's summary, for callers in the same process;
    ``resume`` continues from a checkpoint.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        summary = Coordinator(cfg, run_dir, labels, expected_sites=expected_sites, progress=progress, resume=resume).run(grid)
        if result is not None:
            result.update(summary)

    return app


def deployment_labels(cfg: RunConfig) -> dict[str, list[str]]:
    """Each cohort's label list from the config alone (the coordinator never sees the data)."""
    from fedlora.simulation.demo_data import LABELS  # the demo cohorts' labels

    out = {}
    for c in cfg.cohorts:
        if c.labels:
            out[c.name] = list(c.labels)
        elif c.name in LABELS and not c.data:
            out[c.name] = list(LABELS[c.name])
        else:
            raise ConfigError(f"cohorts.{c.name}.labels", [], "must be listed in deployment: the coordinator holds no data to read them from")
    return out


app = ServerApp()


@app.main()
def deployed(grid: Grid, context: Context) -> None:
    rc = context.run_config
    if not rc.get("out"):
        raise ConfigError("run config out", rc.get("out"), "the run directory is required (flwr run --run-config 'out=\"PATH\"')")
    cfg = config_from_dict(apply_overrides(load_config(str(rc["config"]) if rc.get("config") else None), {"out": str(rc["out"])}))
    labels = deployment_labels(cfg)
    run_dir = RunDir.create(cfg.out)
    expected = int(rc.get("min-sites") or cfg.total_sites)
    Coordinator(cfg, run_dir, labels, expected_sites=expected, progress=False, wait_timeout=float(rc.get("wait-timeout", 120.0))).run(grid)
