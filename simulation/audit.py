"""An empirical privacy audit of a site's local training: canary membership inference.

Each trial trains one site's adapter from a fresh initial adapter on ``n`` examples drawn
from a pool, with the canary (a sequence of random tokens with a fixed label) added in the
"in" world and left out in the "out" world: add/remove adjacency, the privacy unit of
sample-level DP. The canary is a real example (kept out of the pool the trials draw from)
with a label of its own, which no other example has: training without it only pushes that
label down, training with it must raise it. The attack scores the canary by its negative loss
under that label; ``fedlora.privacy.audit.epsilon_lower_bound`` turns the two worlds' scores into an
epsilon lower bound at 95 % confidence.

With DP off the canary is memorised and the bound is clearly above 0 (a detectable leak);
with DP-SGD at a reported epsilon, the bound must not exceed it (if it did, the accounting
or the implementation would be wrong).

    python -m fedlora.simulation.audit --trials 100 --epsilon 2
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from fedlora.client.dp_trainer import DpSgdSettings, train_local_dp
from fedlora.client.trainer import LocalTrainSettings, evaluate_local, train_local
from fedlora.config import PACKAGED_MODEL
from fedlora.model import LoraRuntime, ModelSpec, derive_seed, get_runtime
from fedlora.privacy.accounting import Mechanism, calibrate_noise, epsilon
from fedlora.privacy.audit import epsilon_lower_bound
from fedlora.task import EncodedExamples

from .demo_data import LABELS, generate_site


@dataclass(frozen=True)
class AuditSettings:
    trials: int = 100  # per world
    examples: int = 32  # training examples besides the canary
    steps: int = 15
    learning_rate: float = 0.02
    epsilon: float = 0.0  # > 0: DP-SGD calibrated to this epsilon over ``steps`` full-batch steps
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    seed: int = 0


def _subset(pool: EncodedExamples, index: np.ndarray, extra: tuple[list[int], int] | None) -> EncodedExamples:
    ids = [pool.input_ids[i] for i in index]
    labels = list(pool.labels[index])
    if extra is not None:
        ids.append(extra[0])
        labels.append(extra[1])
    return EncodedExamples(input_ids=ids, labels=np.asarray(labels, dtype=np.int64))





def run_audit(runtime: LoraRuntime, s: AuditSettings, *, progress: bool = True) -> dict[str, Any]:
    labels = LABELS["finance"]
    df = generate_site("finance", 0, 1, seed=s.seed, examples_per_site=max(200, 4 * s.examples))
    y = np.array([labels.index(v) for v in df["label"]])
    pool = runtime.task.encode(runtime.tokenizer, df["text"].tolist(), y, runtime.spec.max_length)
    # the canary: the pool's last example with an extra label of its own; the trials draw from the rest
    k = len(labels) + 1
    canary = (pool.input_ids[-1], k - 1)
    canary_set = _subset(pool, np.array([], dtype=np.int64), canary)
    drawable = len(pool) - 1
    dp: DpSgdSettings | None = None
    reported = math.inf
    if s.epsilon > 0:
        sigma = calibrate_noise(s.epsilon, s.delta, 1.0, s.steps)
        dp = DpSgdSettings(noise_multiplier=sigma, max_grad_norm=s.max_grad_norm, sample_rate=1.0)
        reported = epsilon([Mechanism(sigma, 1.0, s.steps)], s.delta)
    scores: dict[str, list[float]] = {"in": [], "out": []}
    bar = tqdm(total=2 * s.trials, desc="audit trials", disable=not progress)
    for t in range(s.trials):
        for world in ("in", "out"):
            trial_seed = derive_seed(s.seed, "audit-trial", t, world)
            rng = np.random.default_rng(trial_seed)
            data = _subset(pool, rng.choice(drawable, size=s.examples, replace=False), canary if world == "in" else None)
            state = runtime.initial_adapter(trial_seed, "audit", k)
            settings = LocalTrainSettings(s.steps, 0.0, len(data), "adamw", s.learning_rate, 0.0, 0.0)
            kw = dict(seed=trial_seed, site="audit", cohort="audit", num_labels=k, round_=1)
            if dp is None:
                delta = train_local(runtime, state, data, settings, **kw).delta
            else:
                delta = train_local_dp(runtime, state, data, settings, dp, **kw)[0].delta
            trained = {k: state[k] + delta[k] for k in state}
            loss = evaluate_local(runtime, trained, canary_set, seed=trial_seed, cohort="audit", num_labels=k).loss
            scores[world].append(-loss)
            bar.update(1)
    bar.close()
    result = epsilon_lower_bound(scores["in"], scores["out"], s.delta)
    return {"settings": asdict(s), "dp": dp is not None, "reported_epsilon": None if math.isinf(reported) else reported,
            "noise_multiplier": dp.noise_multiplier if dp else 0.0, **asdict(result),
            "mean_score_in": float(np.mean(scores["in"])), "mean_score_out": float(np.mean(scores["out"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=PACKAGED_MODEL, help="base model (default: the packaged MiniLM)")
    ap.add_argument("--trials", type=int, default=100, help="trials per world (in / out)")
    ap.add_argument("--epsilon", type=float, nargs="*", default=[0.0, 2.0], help="0 = DP off; others: DP-SGD at that epsilon")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--examples", type=int, default=32)
    args = ap.parse_args()
    runtime = get_runtime(ModelSpec(args.model, 32, "sequence_classification", 4, 8.0, 0.0, ("query", "value"), "standard"), "cpu")
    for eps in args.epsilon:
        out = run_audit(runtime, AuditSettings(trials=args.trials, epsilon=eps, steps=args.steps, examples=args.examples))
        label = "DP off" if eps <= 0 else f"DP-SGD, reported epsilon {out['reported_epsilon']:.3f}"
        print(f"{label}: epsilon lower bound {out['epsilon_lower_bound']:.3f} (95 %), FPR {out['false_positive_rate']:.2f}, "
              f"FNR {out['false_negative_rate']:.2f}, mean canary loss in {-out['mean_score_in']:.3f} / out {-out['mean_score_out']:.3f}")
        print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
