"""Privacy events: every privacy-relevant act as a frozen, serialisable record.

After Google's ``dp_accounting.dp_event``: an event says *what mechanism ran with which
parameters*, never how much epsilon it cost. Epsilon is always computed from the events
(``fedlora.privacy.accounting``), so a ledger of events is both the report and the audit trail.

* ``DpSgdEvent``: one site's DP-SGD in one round (sample-level DP; privacy unit: one record
  at that site). ``steps`` Poisson-subsampled Gaussian steps with rate ``sample_rate`` and
  noise ``noise_multiplier * max_grad_norm`` on the summed clipped per-example gradients.
* ``EvalNoiseEvent``: one site's noised release of its evaluation metrics in one round
  (privacy unit: one record at that site). One Gaussian mechanism (no sampling) of multiplier
  ``noise_multiplier`` on the metric vector, whose L2 sensitivity to one record is 1 after the
  site's scaling (``fedlora.privacy.eval_release``). It composes with the site's DP-SGD events.
* ``ClientDpEvent``: one cohort's client-level DP in one round (privacy unit: one whole site).
  A subsampled Gaussian with rate ``sample_rate`` (1 unless the sampling was secret from the
  coordinator) and noise ``noise_multiplier * clip_norm`` on the sum of clipped updates.

``identity`` names the site by its key (the fingerprint of its registered public key in
deployment, ``sim:<name>`` in simulation): a site's spend is composed over its identity, so
renaming a site never resets it. ``site`` is the display name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

EVENT_VERSION = 1


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


@dataclass(frozen=True)
class DpSgdEvent:
    kind: ClassVar[str] = "dp_sgd"
    round: int
    site: str
    cohort: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    accountant: str = "rdp"
    noised_by: str = "site"
    sampling: str = "poisson"
    identity: str = ""

    def __post_init__(self) -> None:
        _check(self.noise_multiplier >= 0, f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        _check(0 < self.sample_rate <= 1, f"sample_rate must be in (0, 1], got {self.sample_rate}")
        _check(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        _check(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")


@dataclass(frozen=True)
class EvalNoiseEvent:
    kind: ClassVar[str] = "eval_noise"
    round: int
    site: str
    cohort: str
    noise_multiplier: float
    accountant: str = "rdp"
    identity: str = ""
    sample_rate: float = 1.0  # no sampling: every eval record counts
    steps: int = 1

    def __post_init__(self) -> None:
        _check(self.noise_multiplier > 0, f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        _check(self.sample_rate == 1.0 and self.steps == 1, "an eval release is one unsampled Gaussian mechanism")


@dataclass(frozen=True)
class ClientDpEvent:
    kind: ClassVar[str] = "client_dp"
    round: int
    cohort: str
    noise_multiplier: float
    sample_rate: float
    clip_norm: float
    noised_by: str = "coordinator"  # or "sites" (distributed noise under secure aggregation)
    accountant: str = "rdp"
    sampling: str = "poisson"
    steps: int = 1
    adjacency: str = "zero-out"  # the site list is public: one site's contribution replaced by zeros

    def __post_init__(self) -> None:
        _check(self.noise_multiplier >= 0, f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        _check(0 < self.sample_rate <= 1, f"sample_rate must be in (0, 1], got {self.sample_rate}")
        _check(self.clip_norm > 0, f"clip_norm must be > 0, got {self.clip_norm}")
        _check(self.noised_by in ("coordinator", "sites"), f"noised_by must be coordinator or sites, got {self.noised_by!r}")


Event = DpSgdEvent | EvalNoiseEvent | ClientDpEvent
SiteEvent = DpSgdEvent | EvalNoiseEvent  # what a site's own (sample-level) spend composes
_KINDS: dict[str, type] = {DpSgdEvent.kind: DpSgdEvent, EvalNoiseEvent.kind: EvalNoiseEvent, ClientDpEvent.kind: ClientDpEvent}


def event_to_dict(event: Event) -> dict[str, Any]:
    return {"kind": event.kind, "version": EVENT_VERSION, **asdict(event)}


def event_from_dict(data: dict[str, Any]) -> Event:
    """Rebuild an event; unknown kinds, versions or fields are refused, naming them."""
    kind = data.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown privacy event kind {kind!r}; known: {', '.join(_KINDS)}")
    if data.get("version") != EVENT_VERSION:
        raise ValueError(f"privacy event version {data.get('version')!r} is not supported (this fedlora reads {EVENT_VERSION})")
    cls = _KINDS[kind]
    names = {f.name for f in fields(cls)}
    extra = sorted(set(data) - names - {"kind", "version"})
    if extra:
        raise ValueError(f"privacy event of kind {kind!r} has unknown fields {extra}")
    return cls(**{k: v for k, v in data.items() if k in names})
