"""The fedlora ServerApp (Flower Message API)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import RunConfig

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
