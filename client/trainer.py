"""Local training and evaluation of a cohort's adapter at one site.

Determinism: batch order and dropout are drawn from generators seeded by
(seed, site, round), so a site's result does not depend on which process or engine runs it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedlora.model import LoraRuntime, derive_seed
from fedlora.strategies.lora_math import pad_rank, truncate_rank
from fedlora.tasks import EncodedExamples, EvalResult


@dataclass(frozen=True)
class LocalTrainSettings:
    """Hyper-parameters the coordinator sends with each round."""

    local_steps: int
    local_epochs: float
    batch_size: int
    optimizer: str
    learning_rate: float
    weight_decay: float
    max_grad_norm: float
    momentum: float = 0.0
    max_local_steps: int = 0
    proximal_mu: float = 0.0  # FedProx: the pull towards the global adapter (``proximal_step``); 0: none

    def steps_for(self, n_train: int) -> int:
        """``local_epochs > 0``: ceil(epochs * n / batch), at most ``max_local_steps`` when that is > 0;
        otherwise ``local_steps``."""
        if self.local_epochs > 0:
            steps = max(1, math.ceil(self.local_epochs * n_train / self.batch_size))
            return min(steps, self.max_local_steps) if self.max_local_steps > 0 else steps
        return self.local_steps


@dataclass(frozen=True)
class TrainResult:
    delta: dict[str, np.ndarray]  # trained adapter minus the global adapter
    train_loss: float  # mean loss over the local steps
    steps: int
    num_examples: int
    seconds: float  # wall time of the local steps only


def _batches(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``steps`` batches drawn epoch by epoch from seeded permutations (no example twice per epoch)."""
    size = min(batch_size, n)
    out: list[np.ndarray] = []
    perm, pos = rng.permutation(n), 0
    while len(out) < steps:
        if pos + size > n:
            perm, pos = rng.permutation(n), 0
        out.append(perm[pos: pos + size])
        pos += size
    return out


def make_optimizer(params: list[torch.nn.Parameter], settings: LocalTrainSettings) -> torch.optim.Optimizer:
    """A fresh optimizer per round (its state is not carried across rounds)."""
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.learning_rate, momentum=settings.momentum, weight_decay=settings.weight_decay)


class ProximalTerm:
    """FedProx's proximal term ``(mu / 2) ||w - w_global||^2`` (``fedlora.strategies.fedprox``),
    ``w_global`` the adapter the round started from, applied beside each optimizer step as its own
    decoupled step: ``w <- opt_step(w) - lr * mu * (w - w_global)`` with ``w`` the point before
    the step (``proximal_gradient``). With plain SGD this is exactly SGD on the gradient plus the
    term's gradient ``mu (w - w_global)``; with momentum or AdamW the pull is not rescaled by the
    optimizer's state (as decoupled weight decay). It reads no data, so under DP-SGD it is
    post-processing of the noised step. ``mu = 0``: just the optimizer step."""

    def __init__(self, params: list[torch.nn.Parameter], settings: LocalTrainSettings) -> None:
        self.factor = settings.learning_rate * settings.proximal_mu
        self.params = params
        self.anchors = [p.detach().clone() for p in params] if self.factor > 0 else []

    def step(self, optimizer_step: Callable[[], Any]) -> None:
        """``optimizer_step()`` (e.g. ``opt.step``), then the proximal pull from the point before it."""
        if not self.anchors:
            optimizer_step()
            return
        from fedlora.strategies.fedprox import proximal_gradient

        with torch.no_grad():
            pulls = [proximal_gradient(p.detach(), anchor, self.factor) for p, anchor in zip(self.params, self.anchors)]
        optimizer_step()
        with torch.no_grad():
            for p, pull in zip(self.params, pulls):
                p.sub_(pull)


def load_global(runtime: LoraRuntime, state: Mapping[str, np.ndarray], seed: int, cohort: str, num_labels: int) -> None:
    """Load the cohort's adapter (the cohort's rank R) into the site's model: at a site of a lower
    rank r (``runtime.rank``), its first r components (``lora_math.truncate_rank``)."""
    runtime.load_adapter(truncate_rank(state, runtime.rank), seed, cohort, num_labels)


def adapter_delta(runtime: LoraRuntime, global_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The update a site sends: its trained adapter minus the global adapter it started from. A
    site of a lower rank r takes the difference on the first r components and sends it zero-padded
    to the cohort's rank (``lora_math.pad_rank``): the cohort's shapes, zero beyond r."""
    trained = runtime.export_adapter()
    start = truncate_rank(global_state, runtime.rank)
    return pad_rank({k: trained[k] - np.asarray(start[k], dtype=np.float32) for k in trained}, runtime.spec.lora_rank)


def train_local(runtime: LoraRuntime, global_state: Mapping[str, np.ndarray], examples: EncodedExamples,
                settings: LocalTrainSettings, *, seed: int, site: str, cohort: str, num_labels: int, round_: int) -> TrainResult:
    """Train the cohort's adapter on the site's examples from ``global_state``; return the update."""
    load_global(runtime, global_state, seed, cohort, num_labels)
    model = runtime.model
    model.train()
    params = runtime.trainable_parameters()
    opt = make_optimizer(params, settings)
    prox = ProximalTerm(params, settings)
    steps = settings.steps_for(len(examples))
    rng = np.random.default_rng(derive_seed(seed, "batches", site, round_))
    torch.manual_seed(derive_seed(seed, "dropout", site, round_))
    pad = int(runtime.tokenizer.pad_token_id)
    losses: list[float] = []
    start = time.perf_counter()
    for index in _batches(len(examples), settings.batch_size, steps, rng):
        batch = runtime.task.batch(examples, index, pad, runtime.device)
        opt.zero_grad(set_to_none=True)
        with runtime.autocast():
            loss, _ = runtime.task.loss(model, batch)
        loss.backward()
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        prox.step(opt.step)
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    delta = adapter_delta(runtime, global_state)
    return TrainResult(delta=delta, train_loss=float(np.mean(losses)), steps=steps, num_examples=len(examples), seconds=seconds)


@torch.no_grad()
def evaluate_local(runtime: LoraRuntime, state: Mapping[str, np.ndarray], examples: EncodedExamples, *,
                   seed: int, cohort: str, labels: Sequence[str], batch_size: int = 64) -> EvalResult:
    """The task's evaluation (``Task.evaluate``: loss, accuracy, counts) of the cohort's adapter on the
    site's held-out examples."""
    load_global(runtime, state, seed, cohort, len(labels))
    runtime.model.eval()
    try:
        return runtime.task.evaluate(runtime, examples, list(labels), batch_size)
    finally:
        runtime.model.train()
