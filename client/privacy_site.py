"""A site's own privacy bookkeeping: its ledger, its budget, its refusal.

The ledger lives in the site's Flower ``Context.state`` (record ``fedlora.privacy``), so it
persists across rounds at the site whatever the coordinator says, and, where the site has a
state directory, in ``<state_dir>/privacy.json`` too, so it survives process restarts. Before the first DP round
the site calibrates one noise multiplier for all planned rounds (unless the run fixes
``privacy.noise_multiplier``):
``sigma = min { sigma : eps(rounds * steps steps at rate q, sigma) <= budget }`` with
``q = batch_size / n`` (Poisson sampling, expected batch = the configured batch size). Before
every round it checks that recording the round keeps it within budget, and refuses otherwise
(``BudgetExhausted``): a clear error reply, no training, no update released.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context

from fedlora.errors import FedloraError
from fedlora.files import write_text_atomic
from fedlora.model import LoraRuntime
from fedlora.model import derive_seed
from fedlora.privacy.accounting import calibrate_noise, default_delta
from fedlora.privacy.clipping import add_gaussian_noise, clip_update
from fedlora.privacy.events import DpSgdEvent, event_to_dict
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.task import EncodedExamples

from .release_cache import ReleaseCache, request_digest
from .dp_trainer import DpSgdSettings, train_local_dp
from .trainer import LocalTrainSettings, TrainResult

STATE_KEY = "fedlora.privacy"


class BudgetExhausted(FedloraError):
    """The round would exceed the site's budget; replied with ``fedlora.errors.BUDGET_EXHAUSTED_CODE``."""

    exit_code = 8


def _load(ctx: Context, state_file: Path | None) -> tuple[PrivacyLedger, float | None]:
    """The site's ledger and calibrated sigma: from the node's context state, else from its
    state file (after a process restart), else empty."""
    if STATE_KEY in ctx.state:
        rec = ctx.state[STATE_KEY]
        doc = {"ledger": json.loads(str(rec["ledger"])), "noise_multiplier": rec.get("noise_multiplier")}
    elif state_file is not None and state_file.is_file():
        doc = json.loads(state_file.read_text(encoding="utf-8"))
    else:
        return PrivacyLedger(), None
    sigma = doc.get("noise_multiplier")
    return PrivacyLedger.from_json(doc["ledger"]), float(sigma) if sigma is not None else None


def _save(ctx: Context, state_file: Path | None, ledger: PrivacyLedger, sigma: float) -> None:
    ctx.state[STATE_KEY] = ConfigRecord({"ledger": json.dumps(ledger.to_json()), "noise_multiplier": sigma})
    if state_file is not None:
        write_text_atomic(state_file, json.dumps({"ledger": ledger.to_json(), "noise_multiplier": sigma}, indent=1, sort_keys=True))


def private_round(runtime: LoraRuntime, cfg: Mapping[str, Any], ctx: Context, train: EncodedExamples, global_state: Mapping[str, np.ndarray],
                  settings: LocalTrainSettings, *, site: str, cohort: str, num_labels: int, budget_epsilon: float,
                  state_file: Path | None = None) -> tuple[TrainResult, dict, dict]:
    """One DP-SGD round within the site's budget; returns the update, the round's privacy event
    (as a dict) and the site's budget status (epsilon spent, budget, delta and how it was chosen).

    A round asked again with the same global adapter (the coordinator restarted mid-round)
    gets the same release again, uncharged (``release_cache``). Asked again with another
    adapter, the site trains again with fresh noise and is charged again: two different noisy
    answers to one round cost twice, and reusing the noise would let a coordinator cancel it."""
    n = len(train)
    round_, rounds, seed = int(cfg["round"]), int(cfg["train.rounds"]), int(cfg["seed"])
    accountant, clip = str(cfg["privacy.accountant"]), float(cfg["privacy.max_grad_norm"])
    q = min(1.0, settings.batch_size / n)
    steps = settings.steps_for(n)
    delta, rule = default_delta(float(cfg["privacy.delta"]), n, "training records")
    ledger, sigma = _load(ctx, state_file)
    cache = ReleaseCache(site, state_file.parent if state_file is not None else None)
    digest = request_digest(global_state, cohort=cohort, round_=round_, seed=seed)
    replay = cache.get(digest)
    if replay is not None:
        result, event = replay
        status = {"epsilon_spent": ledger.spent(site, delta, accountant), "budget_epsilon": budget_epsilon, "delta": delta, "delta_rule": rule}
        return result, event, status
    if sigma is None:
        fixed = float(cfg.get("privacy.noise_multiplier", 0.0))
        sigma = fixed if fixed > 0 else calibrate_noise(budget_epsilon, delta, q, rounds * steps, accountant=accountant)
    planned = DpSgdEvent(round=round_, site=site, cohort=cohort, noise_multiplier=sigma, sample_rate=q, steps=steps,
                         max_grad_norm=clip, accountant=accountant)
    exceeds, after = ledger.would_exceed(planned, budget_epsilon, delta, accountant)
    if exceeds:
        raise BudgetExhausted(f"privacy budget exhausted: spent epsilon {ledger.spent(site, delta, accountant):.3f} of "
                              f"{budget_epsilon:g} (delta {delta:.2g}); round {round_} would reach {after:.3f}")
    attempt = sum(1 for e in ledger.site_events(site) if e.round == round_)
    result, ran = train_local_dp(runtime, global_state, train, settings, DpSgdSettings(sigma, clip, q), seed=seed, site=site,
                                 cohort=cohort, num_labels=num_labels, round_=round_, attempt=attempt,
                                 grad_sample_mode=str(cfg.get("privacy.grad_sample_mode", "hooks")))
    mechanism = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm")
    if any(getattr(ran, f) != getattr(planned, f) for f in mechanism):
        raise FedloraError(f"DP training ran {ran}, not the mechanism checked against the budget ({planned}); update withheld")
    ledger.record(planned)  # the checked event, with this run's accountant
    _save(ctx, state_file, ledger, sigma)
    cache.put(digest, result, event_to_dict(planned))
    status = {"epsilon_spent": after, "budget_epsilon": budget_epsilon, "delta": delta, "delta_rule": rule}
    return result, event_to_dict(planned), status


def client_level_update(delta: Mapping[str, np.ndarray], cfg: Mapping[str, Any], *, site: str) -> tuple[dict[str, np.ndarray], int]:
    """A site's contribution under client-level DP: its update clipped to the round's C, plus
    its noise share when the sites draw the noise; and the bit ``1[||u|| <= C]`` that adaptive
    clipping counts."""
    c = float(cfg["privacy.client_clip_norm"])
    clipped, norm = clip_update(delta, c)
    if str(cfg["privacy.client_noise"]) == "sites":
        rng = np.random.default_rng(derive_seed(int(cfg["seed"]), "client-noise", site, int(cfg["round"])))
        clipped = add_gaussian_noise(clipped, float(cfg["privacy.client_noise_std"]), rng)
    return clipped, int(norm <= c)
