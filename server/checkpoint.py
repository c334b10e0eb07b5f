"""The coordinator's checkpoint: everything needed to continue a run exactly where it stopped.

Written after every round into ``RUN_DIR/checkpoint/`` (a temporary folder renamed into
place, so a crash leaves the previous checkpoint whole):

    checkpoint/state.json            round, counters, RNG state, per-cohort flags, client-DP
                                     clip norms, secure-aggregation state, the round-0 and last
                                     metrics lines (``RunState.checkpoint``)
    checkpoint/adapters.safetensors  every cohort's global adapter (keys ``<cohort>/<name>``)
    checkpoint/strategy.safetensors  every cohort's strategy state (server-optimiser moments,
                                     step counters; keys ``<cohort>/<name>``; absent when empty)
    checkpoint/privacy_ledger.json   the run's privacy ledger

Resuming restores all of it (``RunState.restore``), so a run stopped after round k and resumed
ends with the same adapters, strategy states, metrics and epsilon as a run that never stopped
(tests: ``test_resume``, ``test_strategies_federation``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.config import RunConfig, config_from_dict, load_config
from fedlora.errors import ConfigError
from fedlora.privacy.ledger import PrivacyLedger

from .rundir import RunDir

CHECKPOINT_FORMAT = "fedlora-checkpoint/1"
CHECKPOINT_DIR = "checkpoint"


Arrays = dict[str, dict[str, np.ndarray]]  # cohort -> name -> array


def _save_arrays(path: Path, arrays: Arrays) -> dict[str, list[str]]:
    """``arrays`` as one safetensors file (keys ``<cohort>/<name>``); the names' order per cohort
    (safetensors sorts keys)."""
    from safetensors.numpy import save_file

    # (np.ascontiguousarray would turn a 0-d array, a step counter, into shape (1,))
    save_file({f"{c}/{k}": np.require(v, requirements="C") for c, state in arrays.items() for k, v in state.items()}, str(path))
    return {c: list(state) for c, state in arrays.items()}


def _load_arrays(path: Path, order: dict[str, list[str]]) -> Arrays:
    from safetensors.numpy import load_file

    flat = load_file(str(path)) if order else {}
    return {cohort: {name: flat[f"{cohort}/{name}"] for name in names} for cohort, names in order.items()}


@dataclass
class Checkpoint:
    round: int
    adapters: Arrays  # cohort -> global adapter
    ledger: PrivacyLedger
    state: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable coordinator state
    strategy_states: Arrays = field(default_factory=dict)  # cohort -> the strategy's per-cohort arrays

    def save(self, run_dir: RunDir) -> Path:
        def fill(d: Path) -> None:
            order = _save_arrays(d / "adapters.safetensors", self.adapters)
            kept = {c: s for c, s in self.strategy_states.items() if s}
            strategy_order = _save_arrays(d / "strategy.safetensors", kept) if kept else {}
            self.ledger.save(d / "privacy_ledger.json")
            doc = {"format": CHECKPOINT_FORMAT, "round": self.round, "adapter_order": order, "strategy_order": strategy_order,
                   **self.state}
            (d / "state.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")

        return run_dir.write_dir(CHECKPOINT_DIR, fill)

    @classmethod
    def load(cls, run_path: Path) -> Checkpoint:
        d = run_path / CHECKPOINT_DIR
        if not (d / "state.json").is_file():
            raise ConfigError("--resume", str(run_path), "holds no checkpoint (checkpoint/state.json); nothing to resume")
        try:
            doc = json.loads((d / "state.json").read_text(encoding="utf-8"))
            if doc.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
            adapters = _load_arrays(d / "adapters.safetensors", doc.pop("adapter_order"))
            strategy_states = _load_arrays(d / "strategy.safetensors", doc.pop("strategy_order", {}))
            ledger = PrivacyLedger.load(d / "privacy_ledger.json")
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError("--resume", str(run_path), f"has an unreadable checkpoint: {e}") from None
        round_ = int(doc.pop("round"))
        doc.pop("format")
        return cls(round=round_, adapters=adapters, ledger=ledger, state=doc, strategy_states=strategy_states)


def open_stopped_run(run_path: str | Path) -> tuple[RunConfig, RunDir, Checkpoint]:
    """A stopped run to resume: its directory, the config it started with and its last
    checkpoint; refuses a folder that is not a run, a completed run, or one without a checkpoint."""
    run_dir = RunDir(Path(run_path))
    if not (run_dir.path / "config.toml").is_file():
        raise ConfigError("--resume", str(run_path), "is not a fedlora run directory (no config.toml)")
    if (run_dir.path / "summary.json").exists():
        raise ConfigError("--resume", str(run_path), "is a completed run (summary.json exists); nothing to resume")
    checkpoint = Checkpoint.load(run_dir.path)
    return config_from_dict(load_config(run_dir.path / "config.toml")), run_dir, checkpoint
