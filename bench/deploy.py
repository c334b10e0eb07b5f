"""Deployment round time against the same job in `fedlora simulate`: what the processes, the
network and the polling cost.

One job (3 demo sites of one cohort, secure aggregation on, the config's other defaults: DP-SGD,
the packaged model) runs twice on this machine, one run after the other:

1. `fedlora simulate` (one process, the sites served one after another);
2. a real deployment on loopback: `fedlora certs` (the one-shot test/demo form), `fedlora server`
   (SuperLink with TLS and site authentication, the ServerApp) and three `fedlora client`
   processes (SuperNodes with the warm ClientApp) on the same demo files `simulate` writes.

Printed: each run's round times (metrics.jsonl ``seconds``: train, the secure sums, evaluation),
the deployment's mean round time divided by the simulation's (target <= 1.3), the messages a
site receives per round (each is one exchange the coordinator waits for, one after another),
and the waiting per round: the deployment's round time minus the simulation's, i.e. what
messaging and polling add (before ``fedlora.client.supernode_main`` and ``fedlora.server.exchange``
about 3 s per exchange, 86-96 s against ~9 s a round). The sites run in parallel in the
deployment and one after another in the simulation, so on more cores than sites this
understates the waiting; the ratio is the figure the target is about.

    python bench/deploy.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the deployment tests' process helpers

from deployment import Processes, free_port, live_processes, wait_for  # noqa: E402
from fedlora.simulation import demo_data  # noqa: E402

COHORT, SITES, SEED = "finance", 3, 7


def write_job(root: Path, rounds: int, examples: int, model: str = "") -> tuple[Path, list[Path]]:
    """The run config and the sites' data files: the demo files `fedlora simulate` writes for it."""
    doc = {"seed": SEED, "train": {"rounds": rounds}, "demo": {"examples_per_site": examples}, **({"model": {"source": model}} if model else {}),
           "cohorts": {COHORT: {"sites": SITES, "labels": list(demo_data.LABELS[COHORT])}},
           "secure_aggregation": {"enabled": True}}
    (root / "run.toml").write_text(tomli_w.dumps(doc))
    files = demo_data.write_cohort(root / "data", COHORT, SITES, seed=SEED, examples_per_site=examples, size_skew=0.5, label_skew=1.0)
    return root / "run.toml", files  # [demo]'s default skews, as simulate generates them


def round_seconds(run: Path) -> list[float]:
    """The ``seconds`` of every round after round 0 (which only evaluates)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [float(x["seconds"]) for x in lines if x["round"] >= 1]


def messages_per_round(supernode_log: Path) -> dict[int, int]:
    """Round -> messages the site received (Flower logs ``[RUN r, ROUND n]`` before each one)."""
    out: dict[int, int] = {}
    round_ = None
    for line in supernode_log.read_text(errors="replace").splitlines():
        if m := re.search(r"\[RUN \d+, ROUND (\d+)\]", line):
            round_ = int(m.group(1))
        elif "Receiving:" in line and round_ is not None:
            out[round_] = out.get(round_, 0) + 1
    return out


def simulated(p: Processes, config: Path, out: Path, timeout: float) -> list[float]:
    p.start("simulate", "simulate", "--config", str(config), "--out", str(out), "--quiet")
    assert p.wait("simulate", timeout) == 0, p.log("simulate")[-3000:]
    return round_seconds(out)


def deployed(p: Processes, config: Path, files: list[Path], out: Path, timeout: float) -> list[float]:
    names = [f"{COHORT}-{i}" for i in range(1, SITES + 1)]
    keys = p.root / "certs"
    p.start("certs", "certs", "--out", str(keys), "--sites", ",".join(names))
    assert p.wait("certs", 120) == 0, p.log("certs")
    port = free_port()
    p.start("server", "server", "--config", str(config), "--address", f"127.0.0.1:{port}", "--certs", str(keys), "--out", str(out),
            "--wait-timeout", "600")
    for name, data in zip(names, files):
        p.start(name, "client", "--server", f"127.0.0.1:{port}", "--data", str(data), "--domain", COHORT, "--name", name,
                "--key", str(keys / f"{name}.key"), "--root-cert", str(keys / "ca.pem"), "--state-dir", str(p.root / "sites" / name),
                "--device", "cpu")
    wait_for(lambda: p.procs["server"].poll() is not None, timeout, "the deployment to finish")
    assert p.procs["server"].returncode == 0, p.log("server")[-4000:]
    return round_seconds(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--examples-per-site", type=int, default=240, help="demo rows at the largest site")
    ap.add_argument("--model", default="", help="base model (default: the config's, the packaged MiniLM)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds each run may take")
    ap.add_argument("--keep", type=Path, default=None, help="keep the runs and logs in this (new) folder")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="fedlora-bench-deploy-"))
    root.mkdir(parents=True, exist_ok=True)
    config, files = write_job(root, args.rounds, args.examples_per_site, args.model)
    print(f"job: {SITES} sites of cohort {COHORT}, secure aggregation, {args.rounds} round(s), the config's defaults otherwise; "
          f"{os.cpu_count()} CPU(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    started = time.perf_counter()
    with Processes(root) as p:
        sim = simulated(p, config, root / "simulate", args.timeout)
        print(f"simulate:   rounds {', '.join(f'{s:.2f}' for s in sim)} s; mean {np.mean(sim):.2f} s", flush=True)
        dep = deployed(p, config, files, root / "deploy", args.timeout)
    left = live_processes(p.tree)
    print(f"deployment: rounds {', '.join(f'{s:.2f}' for s in dep)} s; mean {np.mean(dep):.2f} s")
    per = messages_per_round(root / "sites" / f"{COHORT}-1" / "supernode.log")
    exchanges = float(np.mean([per.get(r, 0) for r in range(1, args.rounds + 1)]))
    waiting = float(np.mean(dep) - np.mean(sim))
    print(f"ratio deployment / simulate: {np.mean(dep) / np.mean(sim):.3f} (target <= 1.3)")
    print(f"waiting per round (deployment - simulate): {waiting:.2f} s over {exchanges:.0f} messages a site receives a round "
          f"({waiting / max(exchanges, 1):.3f} s per exchange)")
    print(f"bench wall time {time.perf_counter() - started:.0f} s" + (f"; runs and logs in {root}" if args.keep else "")
          + (f"; processes left behind: {left}" if left else ""))
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
