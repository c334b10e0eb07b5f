"""Centralised LoRA baseline on exactly the split a federation uses.

Pools the train splits of a cohort's sites (the same shards and train/eval splits that
``fedlora simulate --data DOMAIN=PATH`` gives its sites, same seed), trains one adapter for
``--epochs`` passes, and evaluates on the pooled eval splits. Compare its accuracy with the
federated run's ``summary.json``.

    python bench/centralised.py --data finance=../shared/data/finance_fpb/data.csv --epochs 5
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fedlora.client.app import site_data
from fedlora.client.trainer import LocalTrainSettings, evaluate_local, train_local
from fedlora.config import config_from_dict
from fedlora.model import ModelSpec, get_runtime
from fedlora.simulation.runner import plan_sites
from fedlora.tasks import EncodedExamples


def _pool(parts: list[EncodedExamples]) -> EncodedExamples:
    return EncodedExamples([ids for p in parts for ids in p.input_ids], np.concatenate([p.labels for p in parts]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, metavar="DOMAIN=PATH")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--epochs", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--label-column", default="label")
    args = ap.parse_args()
    domain, path = args.data.split("=", 1)
    cfg = config_from_dict({"seed": args.seed, "train": {"learning_rate": args.lr, "batch_size": args.batch_size},
                            "cohorts": {domain: {"sites": args.sites, "data": path, "text_column": args.text_column,
                                                 "label_column": args.label_column}}})
    runtime = get_runtime(ModelSpec.from_config(cfg))
    plan = plan_sites(cfg)
    labels = plan.labels[domain]
    parts = [site_data(s, labels, runtime, cfg.seed, cfg.train.eval_fraction) for s in plan.sites]
    train, held_out = _pool([p.train for p in parts]), _pool([p.eval for p in parts])
    settings = LocalTrainSettings(local_steps=1, local_epochs=args.epochs, batch_size=args.batch_size, optimizer="adamw",
                                  learning_rate=args.lr, weight_decay=0.0, max_grad_norm=0.0)
    state = runtime.initial_adapter(cfg.seed, domain, len(labels))
    t0 = time.perf_counter()
    result = train_local(runtime, state, train, settings, seed=cfg.seed, site="centralised", cohort=domain,
                         num_labels=len(labels), round_=1)
    trained = {k: state[k] + result.delta[k] for k in state}
    ev = evaluate_local(runtime, trained, held_out, seed=cfg.seed, cohort=domain, num_labels=len(labels))
    print(json.dumps({"domain": domain, "train_examples": len(train), "eval_examples": ev.num_examples, "epochs": args.epochs,
                      "steps": result.steps, "accuracy": ev.accuracy, "eval_loss": ev.loss,
                      "majority_baseline": max(ev.label_counts) / ev.num_examples, "seconds": time.perf_counter() - t0}, indent=2))


if __name__ == "__main__":
    main()
