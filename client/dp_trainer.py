"""Local DP-SGD (Abadi et al., CCS 2016) on the cohort's adapter with Opacus.

Each step samples a Poisson batch (every training example independently with probability
``q``), computes per-example gradients of the trainable LoRA and head parameters
(Opacus ``GradSampleModule``, hooks mode), clips each example's gradient to L2 norm
``C = max_grad_norm``, sums, adds ``N(0, (sigma C)^2)`` per coordinate and divides by the
expected batch size ``q n`` (Opacus ``DPOptimizer``). The mechanism of one round is therefore
``steps`` Poisson-subsampled Gaussians with (sigma, q): exactly the ``DpSgdEvent`` returned.

Self-checks, each a ``PrivacyCheckError`` naming the problem: the model is in train mode, no
trainable parameter lives in an embedding, every trainable parameter got per-example
gradients, and the adapter actually moved (a known upstream failure mode of DP-LoRA is an
adapter left unchanged while epsilon is still reported).

The hooks are attached for the round and removed afterwards, so the shared base model serves
non-DP sites of the same process unchanged.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedlora.errors import FedloraError
from fedlora.model import LoraRuntime
from fedlora.privacy.events import DpSgdEvent
from fedlora.privacy.randomness import RoundSeeds
from fedlora.tasks import EncodedExamples

from .trainer import LocalTrainSettings, ProximalTerm, TrainResult, adapter_delta, load_global, make_optimizer


class PrivacyCheckError(FedloraError):
    """A DP self-check failed: the round's update must not be released."""

    exit_code = 7


@dataclass(frozen=True)
class DpSgdSettings:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # Poisson rate q; expected batch q * n
    expected_batch: int = 0  # the denominator of the noisy mean; 0: round(q * len(examples)). Sites pass q * public size,
    # so that the update's scale never reveals the exact n


def _check_setup(runtime: LoraRuntime, params: list[nn.Parameter]) -> None:
    if not runtime.model.training:
        raise PrivacyCheckError("the model is not in train mode; Opacus would find no activations")
    ids = {id(p) for p in params}
    for name, module in runtime.model.named_modules():
        if isinstance(module, nn.Embedding) and any(id(p) in ids for p in module.parameters(recurse=False)):
            raise PrivacyCheckError(f"trainable parameters in embedding layer {name}; DP-SGD would have no per-sample gradients")


def _wrap(model: nn.Module, base_opt: torch.optim.Optimizer, dp: DpSgdSettings, expected_batch: int, noise_gen: torch.Generator,
          mode: str) -> tuple[nn.Module, torch.optim.Optimizer, bool]:
    """Opacus's per-sample machinery for one round: ``hooks`` (per-example gradients are
    materialised, clipped and summed by ``DPOptimizer``) or ``ghost`` (ghost clipping, Li et
    al. 2022 / Bu et al. 2023: per-example gradient *norms* from activations and output
    gradients, then a second backward of the loss reweighted by the clip factors)."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    kw = dict(noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm, expected_batch_size=expected_batch,
              loss_reduction="mean", generator=noise_gen)
    if mode == "hooks":
        return GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False), DPOptimizer(base_opt, **kw), False
    if mode == "ghost":
        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean", strict=False,
                                                   max_grad_norm=dp.max_grad_norm, use_ghost_clipping=True)
        return gsm, DPOptimizerFastGradientClipping(base_opt, **kw), True
    raise FedloraError(f"unknown grad_sample_mode {mode!r}; known: hooks, ghost")


def _zero_non_finite_examples(params: list[nn.Parameter]) -> None:
    """An example whose per-example gradient is not finite anywhere (a crafted adapter can make one
    record's loss overflow) contributes zeros instead: its contribution stays within the clip
    bound, and the round neither fails nor carries NaN because of one record (no data-dependent error)."""
    bad = None
    for p in params:
        gs = p.grad_sample
        rows = ~torch.isfinite(gs.reshape(gs.shape[0], -1)).all(dim=1)
        bad = rows if bad is None else bad | rows
    if bad is not None and bool(bad.any()):
        for p in params:
            p.grad_sample[bad] = 0


def train_local_dp(runtime: LoraRuntime, global_state: Mapping[str, np.ndarray], examples: EncodedExamples,
                   settings: LocalTrainSettings, dp: DpSgdSettings, *, seed: int, site: str, cohort: str, num_labels: int,
                   round_: int, seeds: RoundSeeds, grad_sample_mode: str = "hooks") -> tuple[TrainResult, DpSgdEvent]:
    """Train with DP-SGD from ``global_state``; returns the update and the round's privacy event.

    ``seed`` is the run's public seed (it only fixes the initial head, as at every site);
    the noise, the Poisson batches and dropout come from ``seeds`` (``RoundSeeds.fresh()``:
    the OS's secret randomness; ``RoundSeeds.reproducible`` only for research runs)."""
    if not 0 < dp.sample_rate <= 1:
        raise FedloraError(f"DP sample rate must be in (0, 1], got {dp.sample_rate}")
    load_global(runtime, global_state, seed, cohort, num_labels)  # a lower-rank site: the first r components
    model = runtime.model
    model.train()
    params = runtime.trainable_parameters()
    _check_setup(runtime, params)
    n = len(examples)
    steps = settings.steps_for(n)
    expected_batch = dp.expected_batch or max(1, int(round(dp.sample_rate * n)))
    noise_gen = torch.Generator(device=runtime.device).manual_seed(seeds.torch_seed("noise"))
    gsm, opt, ghost = _wrap(model, make_optimizer(params, settings), dp, expected_batch, noise_gen, grad_sample_mode)
    prox = ProximalTerm(params, settings)  # FedProx: data-independent, after the noised step
    try:
        rng = np.random.default_rng(seeds.sampling)
        torch.manual_seed(seeds.torch_seed("dropout"))
        pad = int(runtime.tokenizer.pad_token_id)
        losses: list[float] = []
        start = time.perf_counter()
        for _ in range(steps):
            index = np.flatnonzero(rng.random(n) < dp.sample_rate)
            opt.zero_grad(set_to_none=True)
            if len(index) == 0:  # an empty Poisson batch still takes a (pure-noise) step
                for p in params:
                    if ghost:
                        p.grad = torch.zeros_like(p)
                    else:
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            else:
                batch = runtime.task.batch(examples, index, pad, runtime.device)
                with runtime.autocast():
                    per_example, _ = runtime.task.loss(gsm, batch, reduction="none")
                with warnings.catch_warnings():  # Opacus's hooks on a frozen-input first layer; harmless
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    if ghost:
                        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

                        DPTensorFastGradientClipping(gsm, opt, per_example, "mean").backward()
                    else:
                        per_example.mean().backward()
                attr = "grad" if ghost else "grad_sample"
                missing = [i for i, p in enumerate(params) if getattr(p, attr, None) is None]
                if missing:
                    raise PrivacyCheckError(f"{len(missing)} trainable parameter(s) got no clipped gradients ({grad_sample_mode} mode); "
                                            "refusing to release an update whose clipping is not guaranteed")
                if not ghost:
                    _zero_non_finite_examples(params)
                losses.append(float(per_example.detach().mean()))
            prox.step(opt.step)
        seconds = time.perf_counter() - start
    finally:
        gsm.cleanup()  # remove hooks and per-sample gradient buffers from the shared model
    delta = adapter_delta(runtime, global_state)
    if steps > 0 and not any(np.any(v != 0) for v in delta.values()):
        raise PrivacyCheckError("the adapter did not move during DP training (known DP-LoRA failure); refusing to report it")
    event = DpSgdEvent(round=round_, site=site, cohort=cohort, noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate,
                       steps=steps, max_grad_norm=dp.max_grad_norm)
    result = TrainResult(delta=delta, train_loss=float(np.mean(losses)) if losses else float("nan"), steps=steps,
                         num_examples=n, seconds=seconds)
    return result, event
