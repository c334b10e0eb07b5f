"""Secure aggregation cost: ours against Flower's legacy SecAgg+, side by side in one run.

Part 1, the protocol alone (``fedlora.simulation.secagg_compare``): every site holds a fixed
update of ``--params`` float32 values and an example count; both protocols compute the
weighted mean over an in-process grid with the same neighbours, threshold, clip range and
quantisation levels, without and with ``--dropouts`` of the sites vanishing after sharing
keys. Printed per configuration: CPU seconds per site per round spent on the protocol,
bytes per site per round down and up (message content), the coordinator's CPU seconds per
round, and ours / Flower's. Targets (secure-aggregation issue): per-site CPU <= 1/3 and
bytes up <= 1/2 of Flower's.

Part 2, the demo job (real local training, same seed): mean round time with secure
aggregation divided by the mean round time without it, rounds alternating between the two
runs' configurations is not possible inside one run, so the two runs go one after the other.
Target: <= 1.2.

    python bench/secagg.py --sites 20,100 --params 1000000 --demo-rounds 2
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from fedlora.config import RunConfig, SecureAggregationConfig, config_from_dict
from fedlora.simulation.secagg_compare import Outcome, run_flower, run_ours


def _row(n: int, dropout: float, name: str, o: Outcome, ref: np.ndarray) -> dict[str, float | str | int]:
    return {"sites": n, "dropout": dropout, "impl": name, "site_cpu_s": o.per_site(o.site_cpu),
            "down_MB": o.per_site(o.bytes_down) / 1e6, "up_MB": o.per_site(o.bytes_up) / 1e6,
            "coordinator_cpu_s": o.coordinator_cpu,
            "max_err": float(np.max(np.abs(o.mean - ref))) if o.mean is not None else float("nan")}


def protocol(sites: list[int], params: int, dropouts: list[float], seed: int) -> None:
    logging.getLogger("flwr").setLevel(logging.ERROR)
    cfg = SecureAggregationConfig()
    print(f"protocol only: {params:,} float32 values per site, clip range {cfg.clip_range}, {cfg.bits} bits")
    head = f"{'sites':>5} {'drop':>5} {'impl':>7} {'site CPU s':>10} {'down MB':>9} {'up MB':>8} {'coord CPU s':>11} {'max err':>9}"
    print(head)
    warm = [np.zeros(16, np.float32)] * 4  # first calls (imports, caches) are not a round's cost: one tiny run of each first
    run_ours(warm, [1] * 4, cfg, seed=seed)
    run_flower(warm, [1] * 4, cfg)
    for n in sites:
        rng = np.random.default_rng(seed)
        updates = [rng.normal(0, 0.01, params).astype(np.float32) for _ in range(n)]
        examples = [int(x) for x in rng.integers(50, 1000, n)]
        for dropout in dropouts:
            kept = range(round(dropout * n), n)
            ref = sum(examples[i] * updates[i].astype(np.float64) for i in kept) / sum(examples[i] for i in kept)
            rows = [_row(n, dropout, "ours", run_ours(updates, examples, cfg, dropout=dropout, seed=seed), ref),
                    _row(n, dropout, "flower", run_flower(updates, examples, cfg, dropout=dropout), ref)]
            for r in rows:
                print(f"{r['sites']:>5} {r['dropout']:>5.2f} {r['impl']:>7} {r['site_cpu_s']:>10.4f} {r['down_MB']:>9.3f} "
                      f"{r['up_MB']:>8.3f} {r['coordinator_cpu_s']:>11.3f} {r['max_err']:>9.2e}")
            a, b = rows
            print(f"{'':>5} {'':>5} {'ratio':>7} {a['site_cpu_s'] / b['site_cpu_s']:>10.3f} {a['down_MB'] / b['down_MB']:>9.3f} "
                  f"{a['up_MB'] / b['up_MB']:>8.4f} {a['coordinator_cpu_s'] / b['coordinator_cpu_s']:>11.3f}")


def _demo_round_seconds(rounds: int, secure: bool, out: Path) -> tuple[float, dict]:
    from fedlora.simulation.runner import simulate

    cfg: RunConfig = config_from_dict({"out": str(out), "train": {"rounds": rounds},
                                       "secure_aggregation": {"enabled": secure}})
    run, summary = simulate(cfg, progress=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]
    return float(np.mean([x["seconds"] for x in lines])), summary


def demo(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plain, s0 = _demo_round_seconds(rounds, False, Path(tmp) / "plain")
        secure, s1 = _demo_round_seconds(rounds, True, Path(tmp) / "secure")
    print(f"demo job, {rounds} round(s), 9 sites: mean round {plain:.2f} s in the clear, {secure:.2f} s secure; "
          f"ratio {secure / plain:.3f} (target <= 1.2)")
    for c in s0["cohorts"]:
        print(f"  {c}: accuracy {s0['cohorts'][c]['accuracy']:.4f} clear, {s1['cohorts'][c]['accuracy']:.4f} secure "
              f"(secure_aggregation={s1['cohorts'][c]['secure_aggregation']})")
    print(f"  bytes up {s0['bytes_up']:,} clear, {s1['bytes_up']:,} secure; down {s0['bytes_down']:,} clear, {s1['bytes_down']:,} secure")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", default="20,100", help="comma-separated cohort sizes")
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--dropouts", default="0,0.1", help="comma-separated fractions of sites that vanish after sharing keys")
    ap.add_argument("--demo-rounds", type=int, default=2, help="rounds of the demo job per run (0: skip part 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    protocol([int(s) for s in args.sites.split(",")], args.params, [float(d) for d in args.dropouts.split(",")], args.seed)
    if args.demo_rounds:
        demo(args.demo_rounds)


if __name__ == "__main__":
    main()
