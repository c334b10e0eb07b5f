"""The coordinator's state across rounds, as one object that a checkpoint saves and a resume restores.

Everything a run carries from one round to the next lives here: the cohorts (their sites,
global adapters, strategy states and flags), the byte counters, the coordinator's RNG (site
sampling, client-level noise), the run's privacy ledger, the client-level DP clip norms and the
sites that have trained. The coordinator reads and updates these fields; ``checkpoint`` and
``restore`` are the only code that turns them into a ``Checkpoint`` and back, so a resumed run
continues exactly where the stopped one was (same adapters, strategy moments, RNG draws,
counters and epsilon).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlora.errors import FederationError
from fedlora.privacy.ledger import PrivacyLedger

from .adapter_sends import AdapterSends
from .checkpoint import Checkpoint
from .client_dp import ClientLevelDp
from .cohort import Cohort

log = logging.getLogger("fedlora.server")


@dataclass
class RunState:
    cohorts: dict[str, Cohort]
    rng: np.random.Generator
    ledger: PrivacyLedger = field(default_factory=PrivacyLedger)
    bytes_up: int = 0  # content bytes of every reply received (discovery included)
    bytes_down: int = 0  # content bytes of every message sent
    trained: set[str] = field(default_factory=set)  # the sites whose update went into an aggregate (summary.json "sites")
    client_dp: ClientLevelDp | None = None  # set once the cohorts' sizes are known
    adapters: AdapterSends = field(default_factory=AdapterSends)  # which adapter each site holds (none sent twice)

    def checkpoint(self, round_: int, initial: dict[str, Any], last: dict[str, Any], *, secure: bool, seed: int) -> Checkpoint:
        """The whole state after ``round_`` (``initial``, ``last``: the round-0 and last metrics lines).
        Secure aggregation keeps no state across rounds beyond which cohorts are secure: each
        round's neighbour graph and ids derive from (seed, round), and the sites' key pairs live
        only within a round."""
        state = {
            "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "rng": self.rng.bit_generator.state,
            "cohorts": {c.name: {"active": c.active, "exhausted": sorted(c.exhausted), "sites": sorted(c.nodes.values()), "secure": c.secure}
                        for c in self.cohorts.values()},
            "client_dp": self.client_dp.state_dict() if self.client_dp is not None else None,
            "trained": sorted(self.trained), "initial": initial, "last": last, "adapters_held": self.adapters.by_site(self._names()),
            "secure_aggregation": {"enabled": secure, "seed": seed},
        }
        return Checkpoint(round_, {c.name: c.state for c in self.cohorts.values()}, self.ledger, state,
                          {c.name: c.strategy_state for c in self.cohorts.values()})

    def _names(self) -> dict[int, str]:
        return {node: name for c in self.cohorts.values() for node, name in c.nodes.items()}

    def restore(self, ck: Checkpoint) -> tuple[int, dict[str, Any], dict[str, Any]]:
        """Continue from ``ck``: adapters, strategy states, counters, RNG, flags, ledger; the sites
        are matched by name (their node ids change when processes restart). Returns (rounds
        done, the round-0 line, the last line)."""
        st = ck.state
        for name, cohort in self.cohorts.items():
            saved = st["cohorts"].get(name)
            if saved is None or name not in ck.adapters:
                raise FederationError(f"the checkpoint has no state for cohort {name!r}; cannot resume")
            missing = sorted(set(saved["sites"]) - set(cohort.nodes.values()))
            if missing:
                log.warning("resuming without site(s) %s of cohort %r", ", ".join(missing), name)
            cohort.state = {k: np.array(v, dtype=np.float32) for k, v in ck.adapters[name].items()}
            if name in ck.strategy_states:  # else the strategy keeps no state (its init_state is {})
                cohort.strategy_state = {k: np.array(v) for k, v in ck.strategy_states[name].items()}
            cohort.active, cohort.exhausted = bool(saved["active"]), set(saved["exhausted"])
        self.bytes_up, self.bytes_down = int(st["bytes_up"]), int(st["bytes_down"])
        self.rng.bit_generator.state = st["rng"]
        if self.client_dp is not None and st.get("client_dp"):
            self.client_dp.load_state_dict(st["client_dp"])
        self.trained = set(st.get("trained", ()))
        self.adapters.restore(st.get("adapters_held", {}), self._names())
        self.ledger = PrivacyLedger(ck.ledger.events, ck.ledger.declarations)
        log.info("resuming after round %d", ck.round)
        return ck.round, st["initial"], st["last"]
