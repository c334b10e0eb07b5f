"""The coordinator's side of client-level DP: per-cohort clip norm, noise, events.

The math is in ``fedlora.privacy.client_dp``; this class holds the per-cohort state (the
current clip norm, which adaptive clipping moves), tells the sites the round's public figures
(C, the update noise multiplier, how many sites were sampled; a site that draws a noise share
computes its own share ``z C / sqrt(m)`` from them), and turns a round's clipped updates into
the released aggregate and its ``ClientDpEvent``.

Every event is recorded at sample rate 1 with zero-out adjacency: the coordinator draws the
site sample itself and sees who answers, so the sampling is no secret from the party the sites
protect their data from, and it amplifies nothing (``SAMPLED_BY_COORDINATOR``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedlora.config import PrivacyConfig
from fedlora.privacy.accounting import default_delta
from fedlora.privacy.client_dp import (combined_noise_multiplier, effective_noise, next_clip_norm, noisy_fraction, noisy_mean,
                                       update_noise_multiplier)
from fedlora.privacy.clipping import clip_update
from fedlora.privacy.events import ClientDpEvent


SAMPLED_BY_COORDINATOR = "by the coordinator (not secret): no amplification"
NOT_SAMPLED = "none: every site, every round"
ADJACENCY = "zero-out"  # the site list is public: one site's contribution replaced by zeros


class ClientLevelDp:
    def __init__(self, cfg: PrivacyConfig, site_sample_rate: float, cohort_sizes: Mapping[str, int]) -> None:
        self.cfg, self.q = cfg, float(site_sample_rate)
        self.sizes = dict(cohort_sizes)
        self.clip_norms = {c: float(cfg.client_clip_norm) for c in cohort_sizes}

    # ---- per cohort ------------------------------------------------------------------
    def expected_sites(self, cohort: str) -> float:
        """The fixed denominator ``q n``: the expected number of sampled sites."""
        return self.q * self.sizes[cohort]

    def count_noise(self, cohort: str) -> float:
        """Std of the noise on the clipped count (adaptive clipping only; 0 otherwise)."""
        if not self.cfg.adaptive_clip:
            return 0.0
        if self.cfg.adaptive_count_noise > 0:
            return float(self.cfg.adaptive_count_noise)
        return max(self.expected_sites(cohort) / 20.0, float(self.cfg.client_noise_multiplier))

    def update_multiplier(self, cohort: str) -> float:
        """z for the updates: z itself, or z_delta when part of the budget goes to the count."""
        return update_noise_multiplier(float(self.cfg.client_noise_multiplier), self.count_noise(cohort))

    def delta(self, cohort: str) -> tuple[float, str]:
        return default_delta(float(self.cfg.client_delta), self.sizes[cohort], "sites")

    @property
    def sampling(self) -> str:
        """How the sites of a round are chosen, as the events and the summary state it."""
        return NOT_SAMPLED if self.q >= 1 else SAMPLED_BY_COORDINATOR

    def site_config(self, cohort: str, selected: int) -> dict[str, Any]:
        """The public figures the sampled sites of a cohort need this round: the clip norm C,
        who draws the noise, the update noise multiplier ``z`` (``z_delta`` under adaptive
        clipping) and ``m`` = the number of sites sampled. No noise scale is sent: a site that
        draws a share computes ``N(0, (z C)^2 / m)`` itself, with its own secret randomness."""
        return {"privacy.client_dp": True, "privacy.client_clip_norm": self.clip_norms[cohort],
                "privacy.client_noise": self.cfg.client_noise, "privacy.client_noise_multiplier": self.update_multiplier(cohort),
                "privacy.client_sites": int(selected)}

    def _event(self, round_: int, cohort: str, noise_multiplier: float, accountant: str) -> ClientDpEvent:
        """The round's event: no amplification (sample rate 1; see the module docstring)."""
        return ClientDpEvent(round=round_, cohort=cohort, noise_multiplier=noise_multiplier, sample_rate=1.0,
                             clip_norm=self.clip_norms[cohort], noised_by=self.cfg.client_noise, accountant=accountant,
                             sampling=self.sampling, adjacency=ADJACENCY)

    # ---- one round -------------------------------------------------------------------
    def aggregate(self, round_: int, cohort: str, shapes: Mapping[str, tuple[int, ...]], updates: Sequence[Mapping[str, np.ndarray]],
                  unclipped: Sequence[int], selected: int, rng: np.random.Generator, accountant: str) -> tuple[dict[str, np.ndarray], ClientDpEvent, dict[str, Any]]:
        """The released mean update of a cohort, the round's event, and what to log.

        Coordinator noise: the updates are clipped again here (a no-op for honest sites) and
        one draw of ``N(0, (z C)^2)`` is added. Site noise: the updates already carry their
        shares; a round in which only ``s`` of the ``m`` sampled sites delivered is recorded
        with the effective multiplier ``z sqrt(s / m)``. ``unclipped`` holds one bit per update
        (checked before anything is drawn under adaptive clipping: ValueError otherwise)."""
        bits = [int(b) for b in unclipped]
        if self.cfg.adaptive_clip and (len(bits) != len(updates) or any(b not in (0, 1) for b in bits)):
            raise ValueError(f"adaptive clipping needs one unclipped bit (0 or 1) per update, got {bits} for {len(updates)} updates")
        c, z = self.clip_norms[cohort], self.update_multiplier(cohort)
        denom = self.expected_sites(cohort)
        if self.cfg.client_noise == "coordinator":
            clipped = [clip_update(u, c)[0] for u in updates]
            mean = noisy_mean(clipped, shapes, z * c, denom, rng)
            z_eff = z
        else:
            mean = noisy_mean(updates, shapes, 0.0, denom, None)
            z_eff = effective_noise(z, max(1, selected), len(updates)) if selected else z
        total_z = float(self.cfg.client_noise_multiplier) if z_eff == z else combined_noise_multiplier(z_eff, self.count_noise(cohort))
        event = self._event(round_, cohort, total_z, accountant)
        info: dict[str, Any] = {"client_clip_norm": c, "client_noise_multiplier": total_z, "sites_selected": selected}
        if self.cfg.adaptive_clip:
            self._adapt(cohort, sum(bits), len(bits), rng, info)
        return mean, event, info

    def release_sum(self, round_: int, cohort: str, total: Mapping[str, np.ndarray], delivered: int, selected: int,
                    unclipped: int, rng: np.random.Generator, accountant: str) -> tuple[dict[str, np.ndarray], ClientDpEvent, dict[str, Any]]:
        """Under secure aggregation the coordinator holds only the unmasked sum of the clipped
        updates (it cannot clip them again; each site clipped its own). Site noise: the sum
        already carries the shares, and ``s`` of ``m`` delivered gives ``z sqrt(s / m)``.
        Coordinator noise: one draw of ``N(0, (z C)^2)`` is added to the sum here, and the
        securely summed count of unclipped updates drives adaptive clipping. Either way the
        result is divided by the fixed denominator ``q n``. ``delivered`` is the number of sites
        in the sum (``AggregateSum.sites``) and ``unclipped`` their securely summed bits; a count
        outside ``[0, delivered]`` (a corrupt sum) is refused with ValueError before anything is drawn."""
        if self.cfg.adaptive_clip and not 0 <= int(unclipped) <= int(delivered):
            raise ValueError(f"the secure sum counts {unclipped} unclipped updates among {delivered} sites; refusing the round")
        c, z = self.clip_norms[cohort], self.update_multiplier(cohort)
        central = self.cfg.client_noise == "coordinator"
        mean = noisy_mean([total], {k: np.shape(v) for k, v in total.items()}, z * c if central else 0.0, self.expected_sites(cohort),
                          rng if central else None)
        z_eff = z if central or not selected else effective_noise(z, max(1, selected), delivered)
        total_z = float(self.cfg.client_noise_multiplier) if z_eff == z else combined_noise_multiplier(z_eff, self.count_noise(cohort))
        event = self._event(round_, cohort, total_z, accountant)
        info: dict[str, Any] = {"client_clip_norm": c, "client_noise_multiplier": total_z, "sites_selected": selected}
        if self.cfg.adaptive_clip:
            self._adapt(cohort, int(unclipped), int(delivered), rng, info)
        return mean, event, info

    def _adapt(self, cohort: str, unclipped: int, contributions: int, rng: np.random.Generator, info: dict[str, Any]) -> None:
        """Adaptive clipping: release the noised fraction of unclipped updates with the bits
        centred (``(unclipped - m/2 + N(0, s_b^2)) / (q n) + 1/2``, sensitivity 1/2), move C."""
        c = self.clip_norms[cohort]
        b = noisy_fraction(unclipped, contributions, self.count_noise(cohort), self.expected_sites(cohort), rng)
        self.clip_norms[cohort] = next_clip_norm(c, b, float(self.cfg.adaptive_target_quantile), float(self.cfg.adaptive_clip_lr))
        info["unclipped_fraction_noisy"] = b

    # ---- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"clip_norms": dict(self.clip_norms)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.clip_norms = {str(k): float(v) for k, v in state["clip_norms"].items()}

