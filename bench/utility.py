"""What federation and privacy cost in accuracy, on the real sets in ``../shared/data``.

For each set: a stratified subsample of ``--rows`` rows (seeded), of which ``--test-fraction`` is a
test set no site ever sees; the rest is the training pool. Each configuration trains on the pool
with fedlora's defaults and is scored on the test set through the exported adapter
(``fedlora.inference.load_classifier``, the README's recipe):

* ``centralised``: one site holding the whole pool (no federation, no DP),
* ``fed-iid``, ``fed-dir1``, ``fed-dir0.3``: ``--sites`` sites, IID or Dirichlet(alpha) label skew, no DP,
* ``fed-dp8``, ``fed-dp1``: IID sites with DP-SGD at epsilon 8 and 1 per site,

at equal total local compute: every configuration runs ``--rounds`` rounds of one local epoch of
each site's rows (``train.local_epochs = 1``, no step cap), so every configuration sees the pool
``--rounds`` times (under DP in expectation: Poisson batches of expected size ``batch``).
Secure aggregation is on wherever a cohort has at least 3 sites (the default). Each run is a
separate process, so its peak RSS is its own. Prints one markdown table and writes JSON.

    python bench/utility.py                      # all sets, defaults (about 25 minutes on 2 cores)
    python bench/utility.py --sets finance_fpb --rows 600 --rounds 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

CONFIGS: dict[str, dict] = {
    "centralised": {"sites": 1, "privacy.dp": False},
    "fed-iid": {"privacy.dp": False},
    "fed-dir1": {"privacy.dp": False, "partition.kind": "dirichlet", "partition.alpha": 1.0},
    "fed-dir0.3": {"privacy.dp": False, "partition.kind": "dirichlet", "partition.alpha": 0.3},
    "fed-dp8": {"privacy.dp": True, "privacy.epsilon": 8.0},
    "fed-dp1": {"privacy.dp": True, "privacy.epsilon": 1.0},
}


def macro_f1(y: np.ndarray, p: np.ndarray, k: int) -> float:
    """Unweighted mean over classes of 2 TP / (2 TP + FP + FN) (a class absent from both counts as 0)."""
    f1 = []
    for c in range(k):
        tp = int(np.sum((p == c) & (y == c)))
        denom = 2 * tp + int(np.sum((p == c) & (y != c))) + int(np.sum((p != c) & (y == c)))
        f1.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1))


def split(name: str, rows: int, test_fraction: float, seed: int, out: Path) -> tuple[Path, Path, int, bool]:
    """Stratified subsample -> (pool.csv, test.csv, rows used, subsampled?)."""
    import pandas as pd

    df = pd.read_csv(DATA / name / "data.csv", dtype=str, keep_default_na=False)
    rng = np.random.default_rng(seed)
    sub = rows > 0 and rows < len(df)
    if sub:  # per label, the same share of its rows
        share = rows / len(df)
        keep = [g.sample(n=max(2, int(round(len(g) * share))), random_state=int(rng.integers(2**31))) for _, g in df.groupby("label")]
        df = pd.concat(keep)
    df = df.sample(frac=1.0, random_state=int(rng.integers(2**31))).reset_index(drop=True)
    n_test = int(round(len(df) * test_fraction))
    pool, test = out / f"{name}.pool.csv", out / f"{name}.test.csv"
    df.iloc[n_test:].to_csv(pool, index=False)
    df.iloc[:n_test].to_csv(test, index=False)
    return pool, test, len(df), sub


def run_one(args: argparse.Namespace) -> None:
    """Child process: one configuration on one set; prints one JSON line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import pandas as pd
    import torch

    from fedlora.config import apply_overrides, config_from_dict
    from fedlora.inference import load_classifier
    from fedlora.simulation.runner import simulate

    over = json.loads(args.one)
    sites = over.pop("sites", args.sites)
    domain = args.set.split("_")[0]
    data = {"seed": args.seed, "out": args.run_dir,
            "train": {"rounds": args.rounds, "local_epochs": 1.0, "max_local_steps": 0, "eval_every": args.rounds},
            "cohorts": {domain: {"data": args.pool, "sites": sites}}}
    cfg = config_from_dict(apply_overrides(data, over))
    start = time.perf_counter()
    run_dir, summary = simulate(cfg, progress=False)
    wall = time.perf_counter() - start
    test = pd.read_csv(args.test, dtype=str, keep_default_na=False)
    clf = load_classifier(run_dir / "adapters" / domain)
    preds: list[str] = []
    with torch.no_grad():
        for i in range(0, len(test), 64):
            preds += clf.predict(list(test["text"].iloc[i:i + 64]))
    index = {lab: j for j, lab in enumerate(clf.labels)}
    y = np.array([index[v] for v in test["label"]])
    p = np.array([index[v] for v in preds])
    eps = [v["epsilon"] for v in summary.get("privacy", {}).get("sites", {}).values()]
    print(json.dumps({"accuracy": float(np.mean(y == p)), "macro_f1": macro_f1(y, p, len(clf.labels)),
                      "majority": float(np.bincount(y).max() / len(y)), "wall_s": wall,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                      "bytes": int(summary["bytes_up"] + summary["bytes_down"]), "max_epsilon": max(eps) if eps else None}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="finance_fpb,medical_abstracts,retail_womens_clothing")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rows", type=int, default=1500, help="stratified subsample per set (0: all rows)")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", default="{}", help='JSON of dotted config keys applied to every configuration, e.g. \'{"train.learning_rate": 0.1}\'')
    ap.add_argument("--json", default="", help="also write the results here (default: bench/results/utility.json)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    for hidden in ("set", "pool", "test", "run-dir"):
        ap.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(args)
        return 0
    if not DATA.is_dir():
        print(f"{DATA} is absent: the real sets exist on development and CI machines only", file=sys.stderr)
        return 1
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fedlora-utility-") as tmp:
        for name in args.sets.split(","):
            pool, test, used, sub = split(name, args.rows, args.test_fraction, args.seed, Path(tmp))
            for conf in args.configs.split(","):
                cmd = [sys.executable, __file__, "--one", json.dumps({**CONFIGS[conf], **json.loads(args.override)}), "--set", name, "--pool", str(pool), "--test", str(test),
                       "--run-dir", str(Path(tmp) / f"{name}-{conf}"), "--sites", str(args.sites), "--rounds", str(args.rounds),
                       "--seed", str(args.seed)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{name} {conf} failed (exit {proc.returncode})")
                row = {"set": name, "config": conf, "rows": used, "subsampled": sub, **json.loads(proc.stdout.strip().splitlines()[-1])}
                results.append(row)
                print(f"{name:<24} {conf:<12} accuracy {row['accuracy']:.3f}  macro-F1 {row['macro_f1']:.3f}  "
                      f"{row['wall_s']:.0f} s", file=sys.stderr, flush=True)
    print(f"\n{args.rounds} rounds x 1 local epoch, {args.sites} sites, rows per set {args.rows or 'all'} "
          f"(test {args.test_fraction:.0%} held out), seed {args.seed}\n")
    print("| set | config | accuracy | macro-F1 | majority | max epsilon | wall s | peak RSS GB | MB on the wire |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        eps = f"{r['max_epsilon']:.2f}" if r["max_epsilon"] is not None else "-"
        print(f"| {r['set']} | {r['config']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['majority']:.3f} | {eps} | "
              f"{r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} | {r['bytes'] / 1e6:.1f} |")
    save_results(args, ("sets", "rows", "sites", "rounds", "seed", "override"), results, "utility.json")
    return 0


def save_results(args: argparse.Namespace, keys: tuple[str, ...], results: list[dict], default: str) -> Path:
    """Write ``{"args": the named args, "results": ...}`` to ``--json`` or ``bench/results/<default>``."""
    out = Path(args.json) if args.json else ROOT / "bench" / "results" / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k in keys}, "results": results}, indent=1) + "\n",
                   encoding="utf-8")
    return out


if __name__ == "__main__":
    sys.exit(main())
