"""Federated instruction tuning of the packaged SmolLM2-135M-Instruct on FPB as label-answer data.

FPB (``../shared/data/finance_fpb``) becomes instruction data: the prompt is the sentence and the
choice of labels (``fedlora.tasks.causal_lm.INSTRUCTION``), the answer is the label. A stratified,
seeded subsample of ``--rows`` rows is split into a training pool and a test set no site sees
(``bench/utility.py``'s ``split``). Every configuration is scored on the test set by *generative
accuracy*: greedy decoding of up to 16 tokens, the label the answer names (``causal_lm.predicted_label``),
the way FlowerTune scores FPB:

* ``zero-shot``: the base model, no training (LoRA B = 0);
* ``fed-iid``, ``fed-dir1``: ``--sites`` sites (IID, or Dirichlet(1) label skew), ``--rounds`` rounds of
  ``--steps`` local steps, no DP;
* ``centralised``: one site holding the whole pool, ``--rounds`` rounds of ``sites x steps`` steps
  (equal compute);
* ``fed-dp8`` (only when named in ``--configs``): IID sites with DP-SGD at epsilon 8 per site (the causal-LM DP defaults).

Also printed: training tokens per second of one site (3 timed steps of the run's batch size after
a warm-up, prompt and answer tokens; non-DP configurations). Each
configuration is a separate process. GPU figures (step time, MFU, bf16, 4-bit) need the ``device``
tool and are not measured here.

    python bench/llm.py                          # about 20 minutes on 2 cores
    python bench/llm.py --configs zero-shot,fed-iid --rows 400 --rounds 1   # a quick look
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utility import DATA, save_results, split  # noqa: E402  (the same stratified split as the utility bench)

CONFIGS: dict[str, dict] = {
    "zero-shot": {"train.rounds": 0},
    "fed-iid": {"privacy.dp": False},
    "fed-dir1": {"privacy.dp": False, "partition.kind": "dirichlet", "partition.alpha": 1.0},
    "centralised": {"sites": 1, "privacy.dp": False},
    "fed-dp8": {"privacy.dp": True, "privacy.epsilon": 8.0},  # not in the default run: --configs ...,fed-dp8
}
DEFAULT_CONFIGS = "zero-shot,fed-iid,fed-dir1,centralised"


def _state_of(adapter: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k.removeprefix("base_model.model."): v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}


def _throughput(runtime, cfg, enc) -> float:
    """Training tokens per second of one site: 3 timed local steps (after a warm-up step) of the
    run's batch size on the test examples, from a fresh adapter."""
    from fedlora.client.trainer import LocalTrainSettings, train_local

    t = cfg.train
    state = runtime.initial_adapter(cfg.seed, "finance", 3)
    settings = LocalTrainSettings(1, 0.0, t.batch_size, t.optimizer, t.learning_rate, t.weight_decay, 0.0, t.momentum)
    train_local(runtime, state, enc, settings, seed=0, site="warm-up", cohort="finance", num_labels=3, round_=0)
    res = train_local(runtime, state, enc, LocalTrainSettings(3, 0.0, t.batch_size, t.optimizer, t.learning_rate, t.weight_decay,
                                                              0.0, t.momentum), seed=0, site="timing", cohort="finance",
                      num_labels=3, round_=0)
    return 3 * t.batch_size * float(np.mean([len(r) for r in enc.input_ids])) / res.seconds


def run_one(args: argparse.Namespace) -> None:
    """Child process: one configuration; prints one JSON line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from fedlora.config import apply_overrides, config_from_dict
    from fedlora.model import ModelSpec, get_runtime
    from fedlora.simulation.runner import simulate
    from fedlora.tasks import SiteColumns

    over = json.loads(args.one)
    sites = over.pop("sites", args.sites)
    rounds = over.pop("train.rounds", args.rounds)
    steps = args.steps * (args.sites if sites == 1 else 1)
    data = {"seed": args.seed, "out": args.run_dir, "task": {"kind": "causal_lm"},
            "train": {"rounds": max(rounds, 1), "local_epochs": 0.0, "local_steps": steps, "eval_every": max(rounds, 1),
                      "eval_fraction": 0.05},  # the test set scores; the sites' own eval splits only cost time here
            "cohorts": {"finance": {"data": args.pool, "sites": sites}}}
    cfg = config_from_dict(apply_overrides(data, over))
    runtime = get_runtime(ModelSpec.from_config(cfg), "cpu")
    task = runtime.task
    test, labels = task.read(args.test, SiteColumns(), None)
    enc = task.encode(runtime.tokenizer, test, labels, cfg.model.max_length)
    start = time.perf_counter()
    tokens_per_s = None
    eps: list[float] = []
    if rounds == 0:
        state = runtime.initial_adapter(cfg.seed, "finance", len(labels), include_frozen=True)
    else:
        run_dir, summary = simulate(cfg, progress=False)
        state = _state_of(run_dir / "adapters" / "finance")
        eps = [v["epsilon"] for v in summary.get("privacy", {}).get("sites", {}).values()]
        if not cfg.privacy.dp:
            tokens_per_s = _throughput(runtime, cfg, enc)
    wall = time.perf_counter() - start
    runtime.load_adapter(state, cfg.seed, "finance", len(labels))
    runtime.model.eval()
    res = task.evaluate(runtime, enc, labels, 32)
    y = enc.labels
    print(json.dumps({"accuracy": res.accuracy, "answer_loss": res.loss, "majority": float(np.bincount(y).max() / len(y)),
                      "test_rows": len(y), "wall_s": wall, "train_tokens_per_s_per_site": tokens_per_s,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                      "max_epsilon": max(eps) if eps else None, "steps_per_site_round": steps, "sites": sites, "rounds": rounds}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--rows", type=int, default=800, help="stratified subsample of FPB (0: all 4,838 rows)")
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="local steps per site per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", default="{}", help="JSON of dotted config keys for every configuration")
    ap.add_argument("--json", default="", help="also write the results here (default: bench/results/llm.json)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    for hidden in ("pool", "test", "run-dir"):
        ap.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(args)
        return 0
    if not DATA.is_dir():
        print(f"{DATA} is absent: the real sets exist on development and CI machines only", file=sys.stderr)
        return 1
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fedlora-llm-") as tmp:
        pool, test, used, _ = split("finance_fpb", args.rows, args.test_fraction, args.seed, Path(tmp))
        for conf in args.configs.split(","):
            cmd = [sys.executable, __file__, "--one", json.dumps({**CONFIGS[conf], **json.loads(args.override)}), "--pool", str(pool),
                   "--test", str(test), "--run-dir", str(Path(tmp) / conf), "--sites", str(args.sites), "--rounds", str(args.rounds),
                   "--steps", str(args.steps), "--seed", str(args.seed)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{conf} failed (exit {proc.returncode})")
            row = {"config": conf, "rows": used, **json.loads(proc.stdout.strip().splitlines()[-1])}
            results.append(row)
            print(f"{conf:<12} generative accuracy {row['accuracy']:.3f}  answer loss {row['answer_loss']:.3f}  {row['wall_s']:.0f} s",
                  file=sys.stderr, flush=True)
    print(f"\nFPB as label-answer data, {used} rows ({args.test_fraction:.0%} test), SmolLM2-135M-Instruct, "
          f"{args.sites} sites x {args.rounds} rounds x {args.steps} steps, seed {args.seed}\n")
    print("| config | generative accuracy | answer loss | majority | max epsilon | train tokens/s per site | wall s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        eps = f"{r['max_epsilon']:.2f}" if r["max_epsilon"] is not None else "-"
        tps = f"{r['train_tokens_per_s_per_site']:.0f}" if r["train_tokens_per_s_per_site"] else "-"
        print(f"| {r['config']} | {r['accuracy']:.3f} | {r['answer_loss']:.3f} | {r['majority']:.3f} | {eps} | {tps} | "
              f"{r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} |")
    save_results(args, ("rows", "sites", "rounds", "steps", "seed", "override"), results, "llm.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
