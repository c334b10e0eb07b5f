"""The coordinator's side of client-level DP: per-cohort clip norm, noise, events.

The math is in ``fedlora.privacy.client_dp``; this class holds the per-cohort state (the
current clip norm, which adaptive clipping moves), tells the sites what to do in a round
(clip to C; add a noise share when the sites draw the noise), and turns a round's clipped
updates into the released aggregate and its ``ClientDpEvent``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedlora.config import PrivacyConfig
from fedlora.privacy.accounting import default_delta
from fedlora.privacy.client_dp import combined_noise_multiplier, effective_noise, next_clip_norm, noisy_count, noisy_mean, update_noise_multiplier
from fedlora.privacy.clipping import clip_update, noise_std
from fedlora.privacy.events import ClientDpEvent


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

    def site_config(self, cohort: str, selected: int) -> dict[str, Any]:
        """What the sampled sites of a cohort need this round."""
        c = self.clip_norms[cohort]
        out: dict[str, Any] = {"privacy.client_dp": True, "privacy.client_clip_norm": c, "privacy.client_noise": self.cfg.client_noise}
        if self.cfg.client_noise == "sites":
            out["privacy.client_noise_std"] = noise_std(self.update_multiplier(cohort), c, max(1, selected))
        return out

    # ---- one round -------------------------------------------------------------------
    def aggregate(self, round_: int, cohort: str, shapes: Mapping[str, tuple[int, ...]], updates: Sequence[Mapping[str, np.ndarray]],
                  unclipped: Sequence[int], selected: int, rng: np.random.Generator, accountant: str) -> tuple[dict[str, np.ndarray], ClientDpEvent, dict[str, Any]]:
        """The released mean update of a cohort, the round's event, and what to log.

        Coordinator noise: the updates are clipped again here (a no-op for honest sites) and
        one draw of ``N(0, (z C)^2)`` is added. Site noise: the updates already carry their
        shares; a round in which only ``s`` of the ``m`` sampled sites delivered is recorded
        with the effective multiplier ``z sqrt(s / m)``."""
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
        event = ClientDpEvent(round=round_, cohort=cohort, noise_multiplier=total_z, sample_rate=self.q, clip_norm=c,
                              noised_by="coordinator" if self.cfg.client_noise == "coordinator" else "sites", accountant=accountant)
        info: dict[str, Any] = {"client_clip_norm": c, "client_noise_multiplier": total_z, "sites_selected": selected}
        if self.cfg.adaptive_clip:
            self._adapt(cohort, unclipped, rng, info)
        return mean, event, info

    def release_sum(self, round_: int, cohort: str, total: Mapping[str, np.ndarray], delivered: int, selected: int,
                    unclipped: int, rng: np.random.Generator, accountant: str) -> tuple[dict[str, np.ndarray], ClientDpEvent, dict[str, Any]]:
        """Under secure aggregation the coordinator holds only the unmasked sum of the clipped
        updates (it cannot clip them again; each site clipped its own). Site noise: the sum
        already carries the shares, and ``s`` of ``m`` delivered gives ``z sqrt(s / m)``.
        Coordinator noise: one draw of ``N(0, (z C)^2)`` is added to the sum here, and the
        securely summed count of unclipped updates drives adaptive clipping. Either way the
        result is divided by the fixed denominator ``q n``."""
        c, z = self.clip_norms[cohort], self.update_multiplier(cohort)
        central = self.cfg.client_noise == "coordinator"
        mean = noisy_mean([total], {k: np.shape(v) for k, v in total.items()}, z * c if central else 0.0, self.expected_sites(cohort),
                          rng if central else None)
        z_eff = z if central or not selected else effective_noise(z, max(1, selected), delivered)
        total_z = float(self.cfg.client_noise_multiplier) if z_eff == z else combined_noise_multiplier(z_eff, self.count_noise(cohort))
        event = ClientDpEvent(round=round_, cohort=cohort, noise_multiplier=total_z, sample_rate=self.q, clip_norm=c,
                              noised_by=self.cfg.client_noise, accountant=accountant)
        info: dict[str, Any] = {"client_clip_norm": c, "client_noise_multiplier": total_z, "sites_selected": selected}
        if self.cfg.adaptive_clip:
            self._adapt(cohort, [unclipped], rng, info)
        return mean, event, info

    def _adapt(self, cohort: str, unclipped: Sequence[int], rng: np.random.Generator, info: dict[str, Any]) -> None:
        """Adaptive clipping: release the noised fraction of unclipped updates, move C."""
        c = self.clip_norms[cohort]
        b = noisy_count(unclipped, self.count_noise(cohort), self.expected_sites(cohort), rng)
        self.clip_norms[cohort] = next_clip_norm(c, b, float(self.cfg.adaptive_target_quantile), float(self.cfg.adaptive_clip_lr))
        info["unclipped_fraction_noisy"] = b

    # ---- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"clip_norms": dict(self.clip_norms)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.clip_norms = {str(k): float(v) for k, v in state["clip_norms"].items()}

