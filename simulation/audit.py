"""An empirical privacy audit of a site's DP training: the one-run audit, on the real site path.

The audit of Steinke, Nasr and Jagielski (NeurIPS 2023; its statistics are
``fedlora.privacy.audit.one_run_audit``):

* **Canaries.** ``canaries`` texts of ``canary_words`` random vocabulary words per training run,
  each with a label of its own (labels ``k_base .. k_base + canaries - 1``: one head row each, no
  other example has it), tokenised by the task like any example. Each is put in the site's training
  set independently with probability 1/2, drawn from the OS's secret randomness (add/remove
  adjacency, the privacy unit of sample-level DP). The site's other data (``examples`` synthetic
  finance sentences) is always in.
* **Training.** ``rounds`` rounds of ``fedlora.client.dp_trainer.train_local_dp``, as a site runs
  them: Opacus DP-SGD with Poisson sampling at rate ``sample_rate`` < 1, per-example clipping to
  ``max_grad_norm``, Gaussian noise, batches and dropout from ``RoundSeeds.fresh()``; the global
  adapter moves between rounds (a one-site FedAvg: ``global += delta``). The noise multiplier is
  ``fedlora.privacy.accounting.calibrate_noise(epsilon, delta, q, rounds * steps)`` for the whole
  run; the reported epsilon is recomputed from the ``DpSgdEvent`` s the trainer returned. DP off is
  the same pipeline with noise multiplier 0 (clipping and sampling stay).
* **Attack** (what the coordinator sees: the released adapters). A canary's score is the rise of
  its own label's logit on its own text, final global adapter against the initial (public) one,
  i.e. the sum of the rises over the rounds. Training on a canary pulls its head row towards its
  features; other examples only push that row down a little (softmax), so "in" canaries rise and
  "out" ones do not. Everything between the canary's text and the released update is audited: the
  tokenisation, the forward and backward pass through the LoRA layers and the head, Poisson
  sampling, per-example clipping (of the whole gradient), the noise, the optimiser, the rounds.
* **Bound.** The top (and bottom) ``k`` scores are guessed "in" ("out"), for 8 guess counts fixed in
  advance (Bonferroni); the correct guesses give an epsilon lower bound at ``confidence``.
  ``runs`` independent trainings with fresh canaries are pooled (a canary changes only its own run,
  so the joint mechanism is DP in each canary): the bound grows with the number of canaries (about 8
  needs ~18,000 perfect guesses at 95 %), and needs a delta well below ``0.05 / 8 / canaries`` (the
  theorem's delta term is ``2 m delta``), hence ``delta`` 1e-8 by default, at which the DP runs are
  also calibrated.

With DP off the bound is about the most the canary count can certify; with DP it must stay below
the reported epsilon (if not, the accounting or the implementation is wrong).

    python -m fedlora.simulation.audit --threads 1 --runs 80 --epsilon 0 8   # 40,000 canaries
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fedlora.client.dp_trainer import DpSgdSettings, train_local_dp
from fedlora.client.trainer import LocalTrainSettings
from fedlora.config import PACKAGED_MODEL
from fedlora.model import LoraRuntime, ModelSpec, get_runtime
from fedlora.privacy.accounting import Mechanism, calibrate_noise, epsilon
from fedlora.privacy.audit import one_run_audit
from fedlora.privacy.events import DpSgdEvent
from fedlora.privacy.randomness import RoundSeeds, secret_seed
from fedlora.tasks import EncodedExamples, LabelledTexts

from .demo_data import LABELS, generate_site

COHORT, SITE = "audit", "audit-site"


@dataclass(frozen=True)
class AuditSettings:
    canaries: int = 500  # per training run, each in with probability 1/2 (one head row each)
    runs: int = 1  # independent training runs, their canaries pooled
    examples: int = 16  # the site's other (always included) examples
    rounds: int = 4
    steps: int = 3  # local DP-SGD steps per round
    sample_rate: float = 0.25  # Poisson rate q
    learning_rate: float = 0.5
    optimizer: str = "sgd"  # "sgd" or "adamw" (make_optimizer)
    epsilon: float = 0.0  # > 0: noise calibrated to this over rounds * steps at sample_rate; 0: noise 0
    delta: float = 1e-8
    max_grad_norm: float = 1.0
    canary_words: int = 3
    confidence: float = 0.95
    grad_sample_mode: str = "hooks"  # train_local_dp's per-example machinery: "hooks" or "ghost"
    seed: int = 0  # public: the site's other data, the canary texts, the initial adapter

    def __post_init__(self) -> None:
        for name in ("canaries", "runs", "rounds", "steps", "canary_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"audit {name} must be >= 1, got {getattr(self, name)}")
        if self.examples < 0:
            raise ValueError(f"audit examples must be >= 0, got {self.examples}")
        if not 0 < self.sample_rate < 1:
            raise ValueError(f"audit sample_rate must be in (0, 1) (Poisson sampling), got {self.sample_rate}")
        if self.epsilon < 0 or not 0 < self.delta < 1 or not 0 < self.confidence < 1 or self.max_grad_norm <= 0:
            raise ValueError(f"audit needs epsilon >= 0, delta and confidence in (0, 1), max_grad_norm > 0; got {self}")
        if self.optimizer not in ("sgd", "adamw") or self.grad_sample_mode not in ("hooks", "ghost"):
            raise ValueError(f"audit optimizer must be sgd or adamw and grad_sample_mode hooks or ghost; got "
                             f"{self.optimizer!r}, {self.grad_sample_mode!r}")

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps


def _site_data(runtime: LoraRuntime, s: AuditSettings) -> tuple[EncodedExamples, int]:
    """The site's other examples (finance demo sentences) and their label count."""
    labels = LABELS["finance"]
    if s.examples == 0:
        return EncodedExamples(input_ids=[], labels=np.zeros(0, dtype=np.int64)), len(labels)
    df = generate_site("finance", 0, 1, seed=s.seed, examples_per_site=max(s.examples, 20))[: s.examples]
    y = np.array([labels.index(v) for v in df["label"]], dtype=np.int64)
    return runtime.task.encode(runtime.tokenizer, LabelledTexts(tuple(df["text"]), y), labels, runtime.spec.max_length), len(labels)


def make_canaries(runtime: LoraRuntime, count: int, words: int, first_label: int, rng: np.random.Generator) -> EncodedExamples:
    """``count`` texts of ``words`` random alphabetic vocabulary words (the task's own
    tokenisation), canary i labelled ``first_label + i``."""
    vocab = sorted(w for w in runtime.tokenizer.get_vocab() if w.isascii() and w.isalpha() and len(w) > 2)
    if len(vocab) < words:
        raise ValueError(f"the tokenizer has only {len(vocab)} plain words; need {words} per canary")
    texts = [" ".join(vocab[i] for i in rng.choice(len(vocab), size=words, replace=False)) for _ in range(count)]
    labels = np.arange(first_label, first_label + count, dtype=np.int64)
    return runtime.task.encode(runtime.tokenizer, LabelledTexts(tuple(texts), labels), [], runtime.spec.max_length)


def _concat(a: EncodedExamples, b: EncodedExamples, keep: np.ndarray) -> EncodedExamples:
    idx = np.flatnonzero(keep)
    return EncodedExamples(input_ids=list(a.input_ids) + [b.input_ids[i] for i in idx],
                           labels=np.concatenate([a.labels, b.labels[idx]]).astype(np.int64))


@torch.no_grad()
def own_label_logits(runtime: LoraRuntime, state: dict[str, np.ndarray], examples: EncodedExamples, *, seed: int, num_labels: int,
                     batch_size: int = 128) -> np.ndarray:
    """Each example's logit of its own label under ``state`` (eval mode, no dropout)."""
    runtime.load_adapter(state, seed, COHORT, num_labels)
    model = runtime.model
    model.eval()
    pad = int(runtime.tokenizer.pad_token_id)
    out = []
    try:
        for start in range(0, len(examples), batch_size):
            index = np.arange(start, min(start + batch_size, len(examples)))
            batch = runtime.task.batch(examples, index, pad, runtime.device)
            with runtime.autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            out.append(logits.gather(1, batch["labels"][:, None])[:, 0].cpu().numpy())
    finally:
        model.train()
    return np.concatenate(out).astype(np.float64)


def dp_settings(s: AuditSettings) -> DpSgdSettings:
    """Noise calibrated for the whole run (``rounds * steps`` at rate q), or 0 for DP off."""
    sigma = calibrate_noise(s.epsilon, s.delta, s.sample_rate, s.total_steps) if s.epsilon > 0 else 0.0
    return DpSgdSettings(noise_multiplier=sigma, max_grad_norm=s.max_grad_norm, sample_rate=s.sample_rate)


def audit_one_run(runtime: LoraRuntime, s: AuditSettings, dp: DpSgdSettings, base: EncodedExamples, k_base: int,
                  run: int, bar: tqdm | None = None) -> tuple[np.ndarray, np.ndarray, list[DpSgdEvent]]:
    """One training run with fresh canaries: (scores, secret inclusion bits, the round events)."""
    public = np.random.default_rng([s.seed, run, 0xA0D1])
    canaries = make_canaries(runtime, s.canaries, s.canary_words, k_base, public)
    included = np.random.default_rng(secret_seed()).random(s.canaries) < 0.5  # the secret S, never seen by the attack
    data = _concat(base, canaries, included)
    k = k_base + s.canaries
    settings = LocalTrainSettings(s.steps, 0.0, max(1, round(s.sample_rate * len(data))), s.optimizer, s.learning_rate, 0.0,
                                  s.max_grad_norm)
    state = runtime.initial_adapter(s.seed, COHORT, k)
    before = own_label_logits(runtime, state, canaries, seed=s.seed, num_labels=k)
    events: list[DpSgdEvent] = []
    for round_ in range(1, s.rounds + 1):
        result, event = train_local_dp(runtime, state, data, settings, dp, seed=s.seed, site=SITE, cohort=COHORT, num_labels=k,
                                       round_=round_, seeds=RoundSeeds.fresh(), grad_sample_mode=s.grad_sample_mode)
        state = {name: state[name] + result.delta[name] for name in state}  # one-site FedAvg
        events.append(event)
        if bar is not None:
            bar.update(1)
    after = own_label_logits(runtime, state, canaries, seed=s.seed, num_labels=k)
    return after - before, included, events


def run_audit(runtime: LoraRuntime, s: AuditSettings, *, progress: bool = True) -> dict[str, Any]:
    """The audit (module docstring); a JSON-able summary with the bound and the reported epsilon."""
    start, cpu = time.perf_counter(), time.process_time()
    dp = dp_settings(s)
    base, k_base = _site_data(runtime, s)
    scores, bits, reported = [], [], []  # per run
    bar = tqdm(total=s.runs * s.rounds, desc="audit rounds", disable=not progress)
    for run in range(s.runs):
        sc, inc, events = audit_one_run(runtime, s, dp, base, k_base, run, bar)
        scores.append(sc)
        bits.append(inc)
        reported.append(epsilon([Mechanism(e.noise_multiplier, e.sample_rate, e.steps) for e in events], s.delta))
    bar.close()
    score, included = np.concatenate(scores), np.concatenate(bits)
    result = one_run_audit(score, included, s.delta, s.confidence)
    rep = max(reported)
    return {"settings": asdict(s), "dp": dp.noise_multiplier > 0, "noise_multiplier": dp.noise_multiplier,
            "target_epsilon": s.epsilon if s.epsilon > 0 else None, "reported_epsilon": None if math.isinf(rep) else rep,
            **asdict(result),
            "included": int(included.sum()), "mean_score_in": float(score[included].mean()) if included.any() else float("nan"),
            "mean_score_out": float(score[~included].mean()) if (~included).any() else float("nan"),
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=PACKAGED_MODEL, help="base model (default: the packaged MiniLM)")
    ap.add_argument("--epsilon", type=float, nargs="*", default=[0.0, 8.0], help="0 = DP off (noise 0); others: DP-SGD at that epsilon")
    d = AuditSettings()
    for name in ("canaries", "runs", "examples", "rounds", "steps", "canary_words"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("sample_rate", "learning_rate", "delta", "max_grad_norm", "confidence"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    ap.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adamw"])
    ap.add_argument("--grad-sample-mode", default=d.grad_sample_mode, choices=["hooks", "ghost"])
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--max-length", type=int, default=16, help="tokens per example (the site's other data is truncated to it)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    runtime = get_runtime(ModelSpec(args.model, args.max_length, "sequence_classification", 4, 8.0, 0.0, ("query", "value"), "standard"), args.device)
    fields = {k: getattr(args, k) for k in asdict(d) if k != "epsilon"}
    for eps in args.epsilon:
        out = run_audit(runtime, AuditSettings(epsilon=eps, **fields))
        label = "DP off (noise 0)" if eps <= 0 else f"DP-SGD sigma {out['noise_multiplier']:.3f}, reported epsilon {out['reported_epsilon']:.3f}"
        print(f"{label}: epsilon lower bound {out['epsilon_lower_bound']:.2f} at {out['confidence']:.0%} (delta {out['delta']:g}) from "
              f"{out['correct']}/{out['guesses']} correct guesses on {out['canaries']} canaries (at most {out['max_certifiable']:.2f} "
              f"with these guesses); mean score in {out['mean_score_in']:.3f} / out {out['mean_score_out']:.3f}; "
              f"{out['seconds']:.0f} s wall, {out['cpu_seconds']:.0f} s CPU")
        print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
