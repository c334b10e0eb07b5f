"""The run directory: everything a run produced, written so that nothing is half-written.

Layout::

    RUN_DIR/config.toml          the resolved config (after flags)
    RUN_DIR/sites.json           the sites and their cohorts
    RUN_DIR/partition.json       (simulation) each site's data file, rows and label histogram
    RUN_DIR/metrics.jsonl        one JSON line per round
    RUN_DIR/adapters/<cohort>/   the final adapter in PEFT format (+ fedlora.json)
    RUN_DIR/privacy_ledger.json  every privacy event (DP runs)
    RUN_DIR/checkpoint/          the state after the last completed round (resume from here)
    RUN_DIR/site_state/<site>/   simulated sites' own persistent state (their privacy ledgers)
    RUN_DIR/summary.json         written last; its presence means the run completed

JSON files and adapter folders are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import tomli_w

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.files import atomic_write


def default_run_dir(root: str | Path = "runs") -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{n}"
    return path


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, path: str | Path) -> RunDir:
        """Create a fresh run directory; refuse one that already holds files (nothing is overwritten)."""
        p = Path(path)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise ConfigError("out", str(p), "already exists and is not empty; choose another --out (nothing was overwritten)")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("out", str(p), f"cannot be created: {e.strerror}") from None
        return cls(p)

    @classmethod
    def start(cls, cfg: RunConfig) -> RunDir:
        """A fresh run directory at ``cfg.out`` with the resolved config in ``config.toml``."""
        run_dir = cls.create(cfg.out)
        run_dir.write_toml("config.toml", cfg.to_dict() | {"out": str(run_dir.path)})
        return run_dir

    def _atomic(self, name: str, write: Callable[[Path], None]) -> Path:
        return atomic_write(self.path / name, write)

    def write_json(self, name: str, obj: Any) -> Path:
        return self._atomic(name, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8"))

    def write_toml(self, name: str, obj: Mapping[str, Any]) -> Path:
        return self._atomic(name, lambda p: p.write_bytes(tomli_w.dumps(dict(obj)).encode("utf-8")))

    def append_metrics(self, line: Mapping[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_metrics(self, last_round: int) -> None:
        """Drop metrics lines after ``last_round`` (a round that was cut short before its
        checkpoint); the file is rewritten atomically."""
        path = self.path / "metrics.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        keep = [x for x in lines if x.strip() and json.loads(x)["round"] <= last_round]
        if len(keep) != len(lines):
            self._atomic("metrics.jsonl", lambda p: p.write_text("".join(x + "\n" for x in keep), encoding="utf-8"))

    def write_dir(self, name: str, fill: Callable[[Path], None]) -> Path:
        """Fill a temporary folder, then rename it to ``name`` (replacing an older one)."""
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            fill(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target
