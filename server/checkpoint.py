"""The coordinator's checkpoint: everything needed to continue a run exactly where it stopped.

Written after every round into ``RUN_DIR/checkpoint/`` (a temporary folder renamed into
place, so a crash leaves the previous checkpoint whole):

    checkpoint/state.json            round, counters, RNG state, per-cohort flags, client-DP
                                     clip norms, strategy state (server-optimiser moments),
                                     secure-aggregation state, the round-0 and last metrics lines
    checkpoint/adapters.safetensors  every cohort's global adapter (keys ``<cohort>/<name>``)
    checkpoint/privacy_ledger.json   the run's privacy ledger

Resuming restores all of it, so a run stopped after round k and resumed ends with the same
adapters, metrics and epsilon as a run that never stopped (test: ``test_resume``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.config import RunConfig, config_from_dict, load_config
from fedlora.errors import ConfigError, FederationError
from fedlora.privacy.ledger import PrivacyLedger

from .rundir import RunDir

if TYPE_CHECKING:
    from .coordinator import Coordinator

log = logging.getLogger("fedlora.server")

CHECKPOINT_FORMAT = "fedlora-checkpoint/1"
CHECKPOINT_DIR = "checkpoint"


@dataclass
class Checkpoint:
    round: int
    adapters: dict[str, dict[str, np.ndarray]]  # cohort -> global adapter
    ledger: PrivacyLedger
    state: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable coordinator state

    def save(self, run_dir: RunDir) -> Path:
        from safetensors.numpy import save_file

        def fill(d: Path) -> None:
            flat = {f"{c}/{k}": np.ascontiguousarray(v) for c, state in self.adapters.items() for k, v in state.items()}
            save_file(flat, str(d / "adapters.safetensors"))
            self.ledger.save(d / "privacy_ledger.json")
            order = {c: list(state) for c, state in self.adapters.items()}  # safetensors sorts keys; keep the original order
            doc = {"format": CHECKPOINT_FORMAT, "round": self.round, "adapter_order": order, **self.state}
            (d / "state.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")

        return run_dir.write_dir(CHECKPOINT_DIR, fill)

    @classmethod
    def load(cls, run_path: Path) -> Checkpoint:
        from safetensors.numpy import load_file

        d = run_path / CHECKPOINT_DIR
        if not (d / "state.json").is_file():
            raise ConfigError("--resume", str(run_path), "holds no checkpoint (checkpoint/state.json); nothing to resume")
        try:
            doc = json.loads((d / "state.json").read_text(encoding="utf-8"))
            if doc.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
            adapters: dict[str, dict[str, np.ndarray]] = {}
            flat = load_file(str(d / "adapters.safetensors"))
            for cohort, names in doc.pop("adapter_order").items():
                adapters[cohort] = {name: flat[f"{cohort}/{name}"] for name in names}
            ledger = PrivacyLedger.load(d / "privacy_ledger.json")
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError("--resume", str(run_path), f"has an unreadable checkpoint: {e}") from None
        round_ = int(doc.pop("round"))
        doc.pop("format")
        return cls(round=round_, adapters=adapters, ledger=ledger, state=doc)


def save_checkpoint(co: Coordinator, round_: int, initial: dict[str, Any], last: dict[str, Any]) -> None:
    """The coordinator's whole state after ``round_``. Secure aggregation keeps no state across
    rounds beyond which cohorts are secure: each round's neighbour graph and ids derive from
    (seed, round), and the sites' key pairs live only within a round."""
    state = {
        "bytes_up": co.bytes_up, "bytes_down": co.bytes_down, "rng": co.rng.bit_generator.state,
        "cohorts": {c.name: {"active": c.active, "exhausted": sorted(c.exhausted), "sites": sorted(c.nodes.values()), "secure": c.secure}
                    for c in co.cohorts.values()},
        "client_dp": co.client_dp.state_dict() if co.client_dp is not None else None,
        "strategy": co.strategy.state_dict(), "initial": initial, "last": last,
        "secure_aggregation": {"enabled": co.secagg is not None, "seed": co.cfg.seed},
    }
    Checkpoint(round_, {c.name: c.state for c in co.cohorts.values()}, co.ledger, state).save(co.run_dir)


def restore_checkpoint(co: Coordinator, ck: Checkpoint) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Continue from a checkpoint: adapters, counters, RNG, flags, ledger; the sites are
    matched by name (their node ids change when processes restart)."""
    st = ck.state
    for name, cohort in co.cohorts.items():
        saved = st["cohorts"].get(name)
        if saved is None or name not in ck.adapters:
            raise FederationError(f"the checkpoint has no state for cohort {name!r}; cannot resume")
        missing = sorted(set(saved["sites"]) - set(cohort.nodes.values()))
        if missing:
            log.warning("resuming without site(s) %s of cohort %r", ", ".join(missing), name)
        cohort.state = {k: np.array(v, dtype=np.float32) for k, v in ck.adapters[name].items()}
        cohort.active, cohort.exhausted = bool(saved["active"]), set(saved["exhausted"])
    co.bytes_up, co.bytes_down = int(st["bytes_up"]), int(st["bytes_down"])
    co.rng.bit_generator.state = st["rng"]
    if co.client_dp is not None and st.get("client_dp"):
        co.client_dp.load_state_dict(st["client_dp"])
    co.strategy.load_state_dict(st["strategy"])
    co.ledger = PrivacyLedger(ck.ledger.events, ck.ledger.declarations)
    co.run_dir.truncate_metrics(ck.round)
    log.info("resuming after round %d", ck.round)
    return ck.round, st["initial"], st["last"]


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
