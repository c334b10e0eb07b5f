"""DP-SGD step time against plain training, side by side in one run.

The packaged model with LoRA (r=8 on query/value) and its head, on synthetic demo text,
batch 16, max length 64. Plain, DP with Opacus hooks (per-example gradients) and DP with
ghost clipping rounds alternate, ``--repeats`` times each, so machine noise hits all alike;
the ratios use the medians of the seconds per step. DP runs draw their noise and batches from the
sites' secret randomness (``RoundSeeds.fresh()``: os.urandom-seeded generators), as in a real
round. Target (DP issue): <= 1.15.

    python bench/dp.py --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from fedlora.client.dp_trainer import DpSgdSettings, train_local_dp
from fedlora.client.trainer import LocalTrainSettings, train_local
from fedlora.config import PACKAGED_MODEL
from fedlora.model import ModelSpec, get_runtime
from fedlora.privacy.randomness import RoundSeeds
from fedlora.simulation.demo_data import LABELS, generate_site
from fedlora.tasks import LabelledTexts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    spec = ModelSpec(PACKAGED_MODEL, 64, "sequence_classification", 8, 16.0, 0.0, ("query", "value"), "standard")
    rt = get_runtime(spec, "cpu")
    df = generate_site("finance", 0, 1, seed=0, examples_per_site=640)
    y = np.array([LABELS["finance"].index(v) for v in df["label"]])
    enc = rt.task.encode(rt.tokenizer, LabelledTexts(tuple(df["text"]), y), LABELS["finance"], 64)
    state = rt.initial_adapter(0, "finance", 3)
    settings = LocalTrainSettings(args.steps, 0.0, args.batch_size, "adamw", 2e-3, 0.0, 0.0)
    dp = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=args.batch_size / len(enc))
    kw = dict(seed=0, site="bench", cohort="finance", num_labels=3, round_=1)
    train_local(rt, state, enc, settings, **kw)  # warm-up
    modes = ("hooks", "ghost")
    plain: list[float] = []
    private: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        plain.append(train_local(rt, state, enc, settings, **kw).seconds / args.steps)
        for m in modes:
            private[m].append(train_local_dp(rt, state, enc, settings, dp, grad_sample_mode=m, seeds=RoundSeeds.fresh(),
                                             **kw)[0].seconds / args.steps)
    p = statistics.median(plain)
    print(f"plain step {p * 1000:.0f} ms (batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats)")
    for m in modes:
        d = statistics.median(private[m])
        print(f"DP-SGD ({m}) step {d * 1000:.0f} ms, ratio to plain {d / p:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
