"""Simulation overhead, measured side by side in one run.

For each site count (default 10 and 100, split over the finance, medical and retail cohorts)
it runs the same job (same config and seed, real local training of the packaged model on the
synthetic demo data) on the in-process engine and on Flower's Ray engine, and prints:

* ``inproc_overhead`` = in-process federation wall time / sum of the sites' local training
  time (the steps themselves). 1.0 would mean the harness adds nothing; target <= 1.05.
* ``harness_overhead`` = the same wall time / (local training + local evaluation time):
  what the harness itself adds (messaging, encoding, aggregation, adapter swaps, writing).
* ``ray_vs_inproc``   = Ray job wall time / in-process job wall time (both whole ``simulate``
  calls, Ray's start-up included).

    python bench/simulation.py                       # 10 and 100 sites
    python bench/simulation.py --sites 10 --rounds 1 # quicker
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedlora.config import DEMO_DOMAINS, config_from_dict
from fedlora.simulation.runner import simulate


def _cohorts(n_sites: int) -> dict[str, dict[str, int]]:
    base, extra = divmod(n_sites, len(DEMO_DOMAINS))
    return {d: {"sites": base + (1 if i < extra else 0)} for i, d in enumerate(DEMO_DOMAINS) if base + (1 if i < extra else 0)}


def run_once(engine: str, n_sites: int, args: argparse.Namespace, root: Path) -> dict[str, float]:
    cfg = config_from_dict({
        "seed": 0, "out": str(root / f"{engine}-{n_sites}"),
        "train": {"rounds": args.rounds, "local_steps": args.local_steps, "eval_every": args.eval_every},
        "demo": {"examples_per_site": args.examples_per_site},
        "federation": {"engine": engine},
        "cohorts": _cohorts(n_sites),
    })
    t0 = time.perf_counter()
    run_dir, summary = simulate(cfg, progress=False)
    job_wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(c.get("site_train_seconds", 0.0) for x in lines for c in x["cohorts"].values())
    eval_s = sum(c.get("site_eval_seconds", 0.0) for x in lines for c in x["cohorts"].values())
    return {"job_wall_s": job_wall, "federation_wall_s": summary["wall_seconds"], "site_train_s": train_s, "site_eval_s": eval_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", default="10,100", help="comma-separated site counts")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=8)
    ap.add_argument("--examples-per-site", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=1, help="train.eval_every (evaluation is site work the ratio counts as overhead)")
    ap.add_argument("--engines", default="inprocess,ray")
    args = ap.parse_args()
    engines = args.engines.split(",")
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-") as tmp:
        # warm the process (model load, tokenizer) so neither engine's first run pays it alone
        run_once("inprocess", 1, argparse.Namespace(**{**vars(args), "rounds": 1, "local_steps": 1}), Path(tmp) / "warm")
        rows = []
        for n in (int(s) for s in args.sites.split(",")):
            r = {e: run_once(e, n, args, Path(tmp)) for e in engines}
            row = {"sites": n, **{f"{e}_{k}": round(v, 2) for e, d in r.items() for k, v in d.items()}}
            if "inprocess" in r:
                ip = r["inprocess"]
                row["inproc_overhead"] = round(ip["federation_wall_s"] / ip["site_train_s"], 3)
                row["harness_overhead"] = round(ip["federation_wall_s"] / (ip["site_train_s"] + ip["site_eval_s"]), 3)
            if "inprocess" in r and "ray" in r:
                row["ray_vs_inproc"] = round(r["ray"]["job_wall_s"] / r["inprocess"]["job_wall_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\nsites  wall/train (target <= 1.05)  wall/(train+eval)  ray_vs_inproc")
    for row in rows:
        nan = float("nan")
        print(f"{row['sites']:>5}  {row.get('inproc_overhead', nan):>28.3f}  {row.get('harness_overhead', nan):>17.3f}  "
              f"{row.get('ray_vs_inproc', nan):>13.3f}")


if __name__ == "__main__":
    main()
