"""A site's own privacy bookkeeping: its policy, its ledger, its budget, its refusals.

The site trusts nothing it is told about its own privacy (DESIGN.md section 7). What the
coordinator sends is a request (``fedlora.privacy.policy``); the site applies the more private of
that and its own policy, and computes everything the guarantee rests on itself:

* **sizes**: q, steps, the automatic delta and the reported size come from the site's *public
  size* (declared, or n rounded to 2 significant figures), never from the exact n;
* **noise**: before its first DP message the site calibrates one noise multiplier for all planned
  rounds: ``sigma = min { sigma : eps(eval releases + rounds * steps steps at rate q, sigma) <= budget }``,
  where the noised eval releases (policy ``eval_metrics = "noised"``) get their own multiplier
  calibrated to ``eval_budget_fraction`` of the budget over the planned evaluations; a sigma the
  coordinator asks for is only a floor;
* **randomness**: noise, Poisson batches and noise shares are drawn from the OS's secret
  randomness (``fedlora.privacy.randomness``), fresh for every round and attempt, unless the
  site's policy is the research switch ``reproducible_noise`` (simulation only);
* **ledger**: events are keyed by the site's key identity (``SiteSpec.key_identity``), kept in the
  node's context state and, where the site has a state folder, in ``<state_dir>/privacy.json``,
  so restarts and renames never reset the spend. In deployment, DP is refused without a state
  folder. Before every release the site checks that recording it keeps it within budget and
  refuses otherwise (``BudgetExhausted``): a clear error reply, nothing released.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context

from fedlora.errors import FedloraError
from fedlora.files import write_text_atomic
from fedlora.model import LoraRuntime
from fedlora.privacy.accounting import Mechanism, calibrate_noise, default_delta, epsilon
from fedlora.privacy.clipping import add_gaussian_noise, clip_update, noise_std
from fedlora.privacy.events import DpSgdEvent, EvalNoiseEvent, event_to_dict
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.policy import EffectivePrivacy, PolicyRefused, public_size, resolve_delta
from fedlora.privacy.randomness import RoundSeeds
from fedlora.protocol import ClientDpAsk, PrivacyStatus, RoundPlan
from fedlora.tasks import EncodedExamples

from .dp_trainer import DpSgdSettings, train_local_dp
from .release_cache import ReleaseCache, request_digest
from .site import SiteSpec
from .trainer import LocalTrainSettings, TrainResult

STATE_KEY = "fedlora.privacy"


class BudgetExhausted(FedloraError):
    """The round would exceed the site's budget; replied with ``fedlora.errors.BUDGET_EXHAUSTED_CODE``."""

    exit_code = 8


@dataclass(frozen=True)
class Calibration:
    """The site's noise multipliers for the whole run, fixed before its first DP release."""

    noise_multiplier: float  # DP-SGD
    eval_noise_multiplier: float  # noised eval releases (0: none planned)


def planned_evaluations(plan: RoundPlan) -> int:
    """Evaluations the plan announces: round 0, every ``eval_every``-th round and the last."""
    return 1 + sum(1 for r in range(1, plan.rounds + 1) if r % plan.eval_every == 0 or r == plan.rounds)


def state_file(site: SiteSpec) -> Path | None:
    return Path(site.state_dir) / "privacy.json" if site.state_dir else None


def _load(ctx: Context, path: Path | None) -> tuple[PrivacyLedger, Calibration | None]:
    """The site's ledger and calibration: from its state file (the one ledger of the site, whatever
    run or process asks), else from the node's context state (a site without a state folder), else empty."""
    if path is not None and path.is_file():  # the state file is the ledger: every run on this site spends from it
        doc = json.loads(path.read_text(encoding="utf-8"))
    elif STATE_KEY in ctx.state:
        rec = ctx.state[STATE_KEY]
        doc = json.loads(str(rec["doc"]))
    else:
        return PrivacyLedger(), None
    cal = doc.get("calibration")
    return PrivacyLedger.from_json(doc["ledger"]), Calibration(**cal) if cal else None


def _save(ctx: Context, path: Path | None, ledger: PrivacyLedger, cal: Calibration) -> None:
    doc = {"ledger": ledger.to_json(), "calibration": {"noise_multiplier": cal.noise_multiplier,
                                                        "eval_noise_multiplier": cal.eval_noise_multiplier}}
    ctx.state[STATE_KEY] = ConfigRecord({"doc": json.dumps(doc, sort_keys=True)})
    if path is not None:
        write_text_atomic(path, json.dumps(doc, indent=1, sort_keys=True))


def check_persistence(site: SiteSpec) -> None:
    if not site.policy.persistent:
        raise PolicyRefused("DP needs a persistent privacy ledger, and this site has no state folder (--state-dir / node config "
                            "state-dir): its spend would be forgotten on restart; nothing trained")


def round_seeds(site: SiteSpec, plan: RoundPlan, attempt: int) -> RoundSeeds:
    if site.policy.reproducible_noise:
        return RoundSeeds.reproducible(plan.seed, site.name, plan.round, attempt)
    return RoundSeeds.fresh()


class SitePrivacy:
    """One site's privacy state for one message: policy + request resolved, ledger loaded."""

    def __init__(self, ctx: Context, site: SiteSpec, plan: RoundPlan, eff: EffectivePrivacy, n_records: int,
                 settings: LocalTrainSettings) -> None:
        check_persistence(site)
        self.ctx, self.site, self.plan, self.eff = ctx, site, plan, eff
        self.accountant = eff.accountant
        self.n_public = public_size(n_records, site.policy.public_size)
        self.q = min(1.0, settings.batch_size / self.n_public)
        self.steps = settings.steps_for(self.n_public)
        self.delta, self.delta_rule = resolve_delta(site.policy, eff.delta, self.n_public, default_delta)
        self.path = state_file(site)
        self.ledger, cal = _load(ctx, self.path)
        self.calibration = cal or self._calibrate()

    def _calibrate(self) -> Calibration:
        evals = planned_evaluations(self.plan) if self.eff.eval_metrics == "noised" else 0
        sigma_eval, prior = 0.0, []
        if evals:
            sigma_eval = calibrate_noise(self.site.policy.eval_budget_fraction * self.eff.epsilon, self.delta, 1.0, evals,
                                         accountant=self.accountant)
            prior = [Mechanism(sigma_eval, 1.0, evals)]
        sigma = calibrate_noise(self.eff.epsilon, self.delta, self.q, self.plan.rounds * self.steps, accountant=self.accountant,
                                prior=prior)
        return Calibration(max(sigma, self.eff.min_noise_multiplier), max(sigma_eval, self.eff.min_noise_multiplier if evals else 0.0))

    def own_events(self) -> list[DpSgdEvent | EvalNoiseEvent]:
        """Every sample-level event in this site's own ledger, whatever name or identity it was
        recorded under (the ledger belongs to this site alone: renaming or re-keying resets nothing)."""
        return [e for e in self.ledger.events if isinstance(e, (DpSgdEvent, EvalNoiseEvent))]

    def spent(self) -> float:
        return epsilon([Mechanism(e.noise_multiplier, e.sample_rate, e.steps) for e in self.own_events()], self.delta, self.accountant)

    def check(self, planned: DpSgdEvent | EvalNoiseEvent) -> float:
        mechs = [Mechanism(e.noise_multiplier, e.sample_rate, e.steps) for e in [*self.own_events(), planned]]
        after = epsilon(mechs, self.delta, self.accountant)
        exceeds = after > self.eff.epsilon
        if exceeds:
            raise BudgetExhausted(f"privacy budget exhausted: spent epsilon {self.spent():.3f} of {self.eff.epsilon:g} "
                                  f"(delta {self.delta:.2g}); round {self.plan.round} would reach {after:.3f}")
        return after

    def record(self, event: DpSgdEvent | EvalNoiseEvent) -> None:
        """Keep the event, with the delta and budget it is spent under (``fedlora privacy-report --site`` reads them)."""
        self.ledger.record(event)
        self.ledger.declare(self.site.name, delta=self.delta, delta_rule=self.delta_rule, budget_epsilon=self.eff.epsilon)
        _save(self.ctx, self.path, self.ledger, self.calibration)

    def status(self, spent: float | None = None) -> dict[str, Any]:
        return PrivacyStatus(epsilon_spent=self.spent() if spent is None else spent, budget_epsilon=self.eff.epsilon, delta=self.delta,
                             delta_rule=self.delta_rule, noise="reproducible" if self.site.policy.reproducible_noise else "secret",
                             eval_metrics=self.eff.eval_metrics, public_size=self.n_public).flat()

    def attempt(self) -> int:
        return sum(1 for e in self.own_events() if isinstance(e, DpSgdEvent) and e.round == self.plan.round)


def private_round(runtime: LoraRuntime, plan: RoundPlan, eff: EffectivePrivacy, ctx: Context, train: EncodedExamples,
                  global_state: Mapping[str, np.ndarray], settings: LocalTrainSettings, *, site: SiteSpec,
                  num_labels: int) -> tuple[TrainResult, dict, dict]:
    """One DP-SGD round within the site's budget; returns the update (its ``num_examples`` is the
    public size), the round's privacy event (as a dict) and the site's budget status.

    A round asked again with the same global adapter (the coordinator restarted mid-round) gets
    the same release again, uncharged (``release_cache``: post-processing of the first release).
    Asked again with another adapter, the site trains again with fresh noise and is charged again."""
    sp = SitePrivacy(ctx, site, plan, eff, len(train), settings)
    cache = ReleaseCache(site.name, sp.path.parent if sp.path is not None else None)
    digest = request_digest(global_state, cohort=site.cohort, round_=plan.round, seed=plan.seed)
    replay = cache.get(digest)
    if replay is not None:
        result, event = replay
        return result, event, sp.status()
    planned = DpSgdEvent(round=plan.round, site=site.name, cohort=site.cohort, noise_multiplier=sp.calibration.noise_multiplier,
                         sample_rate=sp.q, steps=sp.steps, max_grad_norm=eff.max_grad_norm, accountant=sp.accountant,
                         identity=site.key_identity)
    after = sp.check(planned)
    public_settings = replace(settings, local_steps=sp.steps, local_epochs=0.0)
    result, ran = train_local_dp(runtime, global_state, train, public_settings,
                                 DpSgdSettings(sp.calibration.noise_multiplier, eff.max_grad_norm, sp.q,
                                               expected_batch=max(1, int(round(sp.q * sp.n_public)))), seed=plan.seed,
                                 site=site.name, cohort=site.cohort, num_labels=num_labels, round_=plan.round,
                                 seeds=round_seeds(site, plan, sp.attempt()), grad_sample_mode=eff.grad_sample_mode)
    mechanism = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm")
    if any(getattr(ran, f) != getattr(planned, f) for f in mechanism):
        raise FedloraError(f"DP training ran {ran}, not the mechanism checked against the budget ({planned}); update withheld")
    # nothing exact about the private data leaves: the public size, no loss, no timing
    result = TrainResult(delta=result.delta, train_loss=float("nan"), steps=sp.steps, num_examples=sp.n_public, seconds=float("nan"))
    sp.record(planned)
    cache.put(digest, result, event_to_dict(planned))
    return result, event_to_dict(planned), sp.status(after)


def private_eval_noise(plan: RoundPlan, eff: EffectivePrivacy, ctx: Context, n_train: int, settings: LocalTrainSettings, *,
                       site: SiteSpec, values: np.ndarray) -> tuple[np.ndarray, dict, dict]:
    """The site's eval metric vector with Gaussian noise (``fedlora.privacy.eval_release``),
    charged to its ledger as one ``EvalNoiseEvent``; refused past the budget."""
    from fedlora.privacy.eval_release import noised

    sp = SitePrivacy(ctx, site, plan, eff, n_train, settings)
    sigma = sp.calibration.eval_noise_multiplier
    if sigma <= 0:
        raise FedloraError("noised eval metrics were not planned when this site calibrated its noise; metrics kept at the site")
    planned = EvalNoiseEvent(round=plan.round, site=site.name, cohort=site.cohort, noise_multiplier=sigma, accountant=sp.accountant,
                             identity=site.key_identity)
    after = sp.check(planned)
    out = noised(values, sigma, np.random.default_rng(round_seeds(site, plan, 0).eval))
    sp.record(planned)
    return out, event_to_dict(planned), sp.status(after)


def client_level_update(delta: Mapping[str, np.ndarray], ask: ClientDpAsk, *, site: SiteSpec, plan: RoundPlan) -> tuple[dict[str, np.ndarray], int]:
    """A site's contribution under client-level DP: its update clipped to the round's C, plus,
    when the sites draw the noise, its own share ``N(0, (z C)^2 / m)`` computed here from the
    public z and m with the site's secret randomness; and the bit ``1[||u|| <= C]`` that
    adaptive clipping counts."""
    c = float(ask.clip_norm)
    clipped, norm = clip_update(delta, c)
    if ask.noise == "sites":
        if not ask.noise_multiplier > 0 or ask.sites < 1:
            raise PolicyRefused(f"client-level noise by the sites, but the coordinator's plan gives z = {ask.noise_multiplier} over "
                                f"{ask.sites} site(s); refusing to add no noise")
        rng = np.random.default_rng(round_seeds(site, plan, 0).share)
        clipped = add_gaussian_noise(clipped, noise_std(float(ask.noise_multiplier), c, int(ask.sites)), rng)
    return clipped, int(norm <= c)
