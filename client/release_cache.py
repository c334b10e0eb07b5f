"""A site's last DP release, so that a round asked again gets the same answer, not a new one.

When the coordinator restarts in the middle of round k (a crash, ``fedlora server --resume``),
it asks the sites for round k again. Training again would draw fresh noise: a second noisy
answer to the same question, charged a second time (and the run's result would differ from
one that never stopped). Sending the *same* answer again reveals nothing new (it is
post-processing of the first release), so it is free: the site keeps its last release and
replays it when the request is the same.

"The same request" is the digest ``sha256(cohort, round, seed, adapter keys, shapes and
bytes)``: a coordinator that changes the global adapter between the two asks gets a freshly
trained, freshly charged answer, so a replay can never be used to obtain two different noisy
views of one round. The release is kept in ``<state_dir>/last_release.json`` and the
safetensors file it names (or in memory for a site without a state folder); only the latest one is kept.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.files import atomic_write, write_text_atomic

from .trainer import TrainResult

_MEMORY: dict[str, tuple[str, TrainResult, dict[str, Any]]] = {}


def request_digest(global_state: Mapping[str, np.ndarray], *, cohort: str, round_: int, seed: int) -> str:
    h = hashlib.sha256(f"{cohort}\0{round_}\0{seed}\0".encode())
    for k in sorted(global_state):
        v = np.ascontiguousarray(global_state[k])
        h.update(f"{k}\0{v.dtype.str}\0{v.shape}\0".encode())
        h.update(memoryview(v).cast("B"))
    return h.hexdigest()


class ReleaseCache:
    def __init__(self, site: str, state_dir: str | Path | None) -> None:
        self.site = site
        self.dir = Path(state_dir) if state_dir else None

    def get(self, digest: str) -> tuple[TrainResult, dict[str, Any]] | None:
        """The stored release for this exact request, if it is the last one made."""
        if self.dir is None:
            hit = _MEMORY.get(self.site)
            return (hit[1], hit[2]) if hit is not None and hit[0] == digest else None
        meta_path = self.dir / "last_release.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("digest") != digest:
            return None
        from safetensors.numpy import load_file

        arrays = load_file(str(self.dir / meta["file"]))
        delta = {k: arrays[k] for k in meta["order"]}
        r = meta["result"]
        return TrainResult(delta, float(r["train_loss"]), int(r["steps"]), int(r["num_examples"]), float(r["seconds"])), meta["event"]

    def put(self, digest: str, result: TrainResult, event: dict[str, Any]) -> None:
        if self.dir is None:
            _MEMORY[self.site] = (digest, result, event)
            return
        from safetensors.numpy import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"last_release.{digest[:16]}.safetensors"  # the json names its arrays' file: a crash between the two writes leaves a consistent pair
        atomic_write(self.dir / name, lambda p: save_file({k: np.ascontiguousarray(v) for k, v in result.delta.items()}, str(p)))
        meta = {"digest": digest, "file": name, "order": list(result.delta), "event": event,
                "result": {"train_loss": result.train_loss, "steps": result.steps, "num_examples": result.num_examples, "seconds": result.seconds}}
        write_text_atomic(self.dir / "last_release.json", json.dumps(meta, sort_keys=True))
        for old in self.dir.glob("last_release.*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
