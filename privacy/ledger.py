"""The privacy ledger: every privacy event of a run, persisted; epsilon is derived, never stored.

``spent(site)`` composes all of that site's DP-SGD events from round 1 on; ``would_exceed``
answers "may this site run another round at these parameters within its budget?" before any
training happens. The ledger is a JSON document (``privacy_ledger.json`` in a run directory
and in checkpoints), written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedlora.files import write_text_atomic

from .accounting import Mechanism, epsilon
from .events import ClientDpEvent, DpSgdEvent, EvalNoiseEvent, Event, SiteEvent, event_from_dict, event_to_dict

LEDGER_FORMAT = "fedlora-privacy-ledger/1"


class PrivacyLedger:
    def __init__(self, events: Iterable[Event] = (), declarations: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._events: list[Event] = list(events)
        self._declarations: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (declarations or {}).items()}

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(self._events)

    def record(self, event: Event) -> None:
        self._events.append(event)

    def declare(self, who: str, **facts: Any) -> None:
        """The assumptions epsilon is computed under, per privacy unit (a site, or ``cohort:<name>``
        for client-level DP): delta and the rule that chose it, the budget. Later declarations
        of the same unit replace earlier ones."""
        self._declarations[who] = dict(facts)

    @property
    def declarations(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self._declarations.items()}

    def site_events(self, site: str) -> list[DpSgdEvent]:
        """A site's DP-SGD events (by display name)."""
        return [e for e in self._events if isinstance(e, DpSgdEvent) and e.site == site]

    def unit_events(self, site: str) -> list[SiteEvent]:
        """Every sample-level event of one site (DP-SGD and eval releases), by display name."""
        return [e for e in self._events if isinstance(e, (DpSgdEvent, EvalNoiseEvent)) and e.site == site]

    def identity_events(self, identity: str) -> list[SiteEvent]:
        """Every sample-level event recorded under a site identity (its key), whatever its name was."""
        return [e for e in self._events if isinstance(e, (DpSgdEvent, EvalNoiseEvent)) and e.identity == identity]

    def cohort_events(self, cohort: str) -> list[ClientDpEvent]:
        return [e for e in self._events if isinstance(e, ClientDpEvent) and e.cohort == cohort]

    @staticmethod
    def _mechanisms(events: Iterable[Event]) -> list[Mechanism]:
        return [Mechanism(e.noise_multiplier, e.sample_rate, e.steps) for e in events]

    def spent(self, site: str, delta: float, accountant: str = "rdp") -> float:
        """Sample-level epsilon a site has spent over all its recorded rounds (DP-SGD and eval releases)."""
        return epsilon(self._mechanisms(self.unit_events(site)), delta, accountant)

    def client_level_spent(self, cohort: str, delta: float, accountant: str = "rdp") -> float:
        """Client-level epsilon (privacy unit: one whole site) of a cohort's aggregate."""
        return epsilon(self._mechanisms(self.cohort_events(cohort)), delta, accountant)

    def would_exceed(self, planned: SiteEvent | Iterable[SiteEvent], budget_epsilon: float, delta: float,
                     accountant: str = "rdp") -> tuple[bool, float]:
        """(True if recording ``planned`` (one event or several of one site) would take the site past
        its budget, the epsilon it would reach). Composed over the site's identity when it has one."""
        planned = [planned] if isinstance(planned, (DpSgdEvent, EvalNoiseEvent)) else list(planned)
        first = planned[0]
        prior = self.identity_events(first.identity) if first.identity else self.unit_events(first.site)
        after = epsilon(self._mechanisms([*prior, *planned]), delta, accountant)
        return after > budget_epsilon, after

    def to_json(self) -> dict:
        return {"format": LEDGER_FORMAT, "events": [event_to_dict(e) for e in self._events], "declarations": self._declarations}

    @classmethod
    def from_json(cls, data: dict) -> PrivacyLedger:
        if data.get("format") != LEDGER_FORMAT:
            raise ValueError(f"not a fedlora privacy ledger (format {data.get('format')!r}, expected {LEDGER_FORMAT!r})")
        return cls((event_from_dict(e) for e in data["events"]), data.get("declarations", {}))

    def save(self, path: str | Path) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
