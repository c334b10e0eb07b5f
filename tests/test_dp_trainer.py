"""DP-SGD at a site with real Opacus: the clipping bound, the noise scale, the self-checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.client.dp_trainer import DpSgdSettings, PrivacyCheckError, train_local_dp
from fedlora.client.trainer import LocalTrainSettings, train_local
from fedlora.model import ModelSpec, get_runtime
from fedlora.privacy.accounting import Mechanism, epsilon
from fedlora.privacy.randomness import RoundSeeds
from fedlora.simulation.demo_data import LABELS, generate_site
from fedlora.tasks import LabelledTexts


@pytest.fixture
def site(tiny_model: Path):
    spec = ModelSpec(str(tiny_model), 32, "sequence_classification", 4, 8.0, 0.0, ("query", "value"), "standard")
    rt = get_runtime(spec, "cpu")
    df = generate_site("finance", 0, 1, seed=0, examples_per_site=64)
    y = np.array([LABELS["finance"].index(v) for v in df["label"]])
    return rt, rt.task.encode(rt.tokenizer, LabelledTexts(tuple(df["text"]), y), LABELS["finance"], 32), rt.initial_adapter(0, "finance", 3)


def _sgd(lr: float, steps: int = 1) -> LocalTrainSettings:
    return LocalTrainSettings(local_steps=steps, local_epochs=0.0, batch_size=64, optimizer="sgd", learning_rate=lr,
                              weight_decay=0.0, max_grad_norm=0.0)


def _norm(delta: dict) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in delta.values())))


def _run(site, dp: DpSgdSettings, lr: float = 1.0, seed: int = 0, mode: str = "hooks"):
    rt, enc, state = site
    return train_local_dp(rt, state, enc, _sgd(lr), dp, seed=seed, site="bank-1", cohort="finance", num_labels=3, round_=1,
                          seeds=RoundSeeds.reproducible(seed, "bank-1", 1), grad_sample_mode=mode)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_per_example_clipping_bounds_the_step(site, mode: str) -> None:
    """Full batch (q = 1), no noise, SGD with lr 1: the step is the mean of clipped per-example
    gradients, so its norm is at most C, although the unclipped gradient is far larger."""
    c = 1e-3
    res, event = _run(site, DpSgdSettings(noise_multiplier=0.0, max_grad_norm=c, sample_rate=1.0), mode=mode)
    assert 0 < _norm(res.delta) <= c * (1 + 1e-4)
    rt, enc, state = site
    plain = train_local(rt, state, enc, _sgd(1.0), seed=0, site="bank-1", cohort="finance", num_labels=3, round_=1)
    assert _norm(plain.delta) > 20 * c
    assert (event.steps, event.sample_rate, event.noise_multiplier) == (1, 1.0, 0.0)
    assert epsilon([Mechanism(event.noise_multiplier, event.sample_rate, event.steps)], 1e-5) == float("inf")


def test_ghost_clipping_computes_the_same_clipped_step_as_per_example_hooks(site) -> None:
    dp = DpSgdSettings(noise_multiplier=0.0, max_grad_norm=0.05, sample_rate=1.0)
    hooks, _ = _run(site, dp, mode="hooks")
    ghost, _ = _run(site, dp, mode="ghost")
    for k in hooks.delta:
        np.testing.assert_allclose(ghost.delta[k], hooks.delta[k], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_noise_has_the_configured_scale(site, mode: str) -> None:
    """Noisy minus noiseless step (same batch): per coordinate N(0, (sigma C / (q n))^2)."""
    c, sigma = 0.5, 2.0
    quiet, _ = _run(site, DpSgdSettings(0.0, c, 1.0), mode=mode)
    noisy, event = _run(site, DpSgdSettings(sigma, c, 1.0), mode=mode)
    diff = np.concatenate([(noisy.delta[k] - quiet.delta[k]).ravel() for k in quiet.delta]).astype(np.float64)
    n = len(site[1])
    assert diff.size > 5000
    assert np.std(diff) == pytest.approx(sigma * c / n, rel=0.05)
    assert abs(np.mean(diff)) < 4 * sigma * c / n / np.sqrt(diff.size)
    assert event.noise_multiplier == sigma


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_the_shared_model_is_left_as_it_was(site, mode: str) -> None:
    rt, enc, state = site
    before = train_local(rt, state, enc, _sgd(0.1), seed=0, site="s", cohort="finance", num_labels=3, round_=2)
    _run(site, DpSgdSettings(1.0, 1.0, 0.25), mode=mode)
    after = train_local(rt, state, enc, _sgd(0.1), seed=0, site="s", cohort="finance", num_labels=3, round_=2)
    assert all(np.array_equal(before.delta[k], after.delta[k]) for k in before.delta)
    assert not any(hasattr(p, "grad_sample") for p in rt.model.parameters())


def test_self_checks_refuse_a_model_in_eval_mode_and_an_adapter_that_did_not_move(site, monkeypatch) -> None:
    rt, enc, state = site
    moved_before = {k: v + np.float32(0.05) for k, v in state.items()}  # B != 0, so a 1e-30 step changes no float32
    with pytest.raises(PrivacyCheckError, match="did not move"):
        train_local_dp(rt, moved_before, enc, _sgd(1e-30), DpSgdSettings(0.0, 1.0, 1.0), seed=0, site="s", cohort="finance",
                       num_labels=3, round_=1, seeds=RoundSeeds.fresh())
    # a wrapper whose .train() does not reach the modules (Opacus would then see no activations)
    monkeypatch.setattr(type(rt.model), "train", lambda self, mode=True: torch.nn.Module.train(self, False))
    with pytest.raises(PrivacyCheckError, match="not in train mode"):
        _run(site, DpSgdSettings(1.0, 1.0, 0.5))
