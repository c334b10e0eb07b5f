"""The strategy interface: turn the sites' adapter updates into the next global adapter.

A site's update is ``delta_k = theta_k - theta`` (its locally trained adapter minus the global
adapter it started from), reported with ``n_k`` (its number of training examples). Strategies
only see updates, never data; one cohort is aggregated at a time. Pure numpy: no torch, no Flower.

The contract, per cohort and round (the aggregation pipeline drives it):

``needs``
    ``"sum"``: the rule needs only the weighted mean ``sum_k w_k delta_k / sum_k w_k`` with
    ``w_k = weight(n_k)``, which secure aggregation (and a client-level DP release) can give;
    the rule itself may be nonlinear in that mean (FedAdam). ``"each"``: the rule needs every
    site's update (median, trimmed mean, Krum); refused under secure aggregation with
    ``secure_refusal()``'s message, which names the strategies that compose with it.
``weight(num_examples, cap) -> float``
    The strategy's aggregation weights, in this one place, the same in the clear and under
    secure aggregation: ``min(n, cap)`` with the run's public cap (``federation.weight_cap``).
    Only ratios matter (the mean divides by the total), so a secure site encodes
    ``weight(n, cap) / cap`` in ``[0, 1]`` (``site_weight``) and the sum gives the same mean.
``init_state(global_state) -> state``
    The strategy's per-cohort state before the first round: a dict of named numpy arrays
    (server-optimiser moments, a step counter), ``{}`` for stateless rules. A checkpoint saves
    it as safetensors; loading the arrays back and calling ``step`` gives the identical result.
``step(cohort, round_, global_state, combined, state) -> (next_global, next_state)``
    ``combined`` is what ``combine(updates)`` returns: for ``"sum"`` the weighted mean update
    (one array per adapter key); for ``"each"`` the list of ``SiteUpdate`` sorted by site, their
    ``weight`` still the reported example counts. Called only in rounds with something to
    aggregate. Never mutates its inputs; ``next_global`` keeps each array's dtype; arithmetic
    runs in float64; moments are kept in float64. One instance serves every cohort: all
    per-cohort memory lives in ``state``, never on the instance.

``aggregate(global_state, updates)`` is the older one-call form (combine then step), kept for
the coordinator until the pipeline lands; it works only for strategies without state.
``get_strategy(name, **options)`` builds a registered strategy; an unknown name, an unknown
option or a bad value raises ``StrategyOptionError`` (a ``ValueError``) naming it and what is
allowed. Adding a strategy is one file plus its entry in ``_registry``.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import numpy as np

from fedlora.errors import FedloraError

State = Mapping[str, np.ndarray]
StrategyState = dict[str, np.ndarray]
Needs = Literal["sum", "each"]
Combined = Mapping[str, np.ndarray] | Sequence["SiteUpdate"]


class StrategyOptionError(FedloraError, ValueError):
    """An unknown strategy, an unknown option, or an option value out of its range."""

    exit_code = 2


@dataclass(frozen=True)
class SiteUpdate:
    """One site's contribution to a round: its update and its reported number of training
    examples (``weight``; a strategy turns it into an aggregation weight with ``Strategy.weight``)."""

    site: str
    delta: State
    weight: float


class Strategy(ABC):
    """Owns a server update rule; see the module docstring for the contract."""

    name: ClassVar[str] = "strategy"
    needs: ClassVar[Needs] = "sum"

    # ---- the interface ---------------------------------------------------------------
    def weight(self, num_examples: float, cap: float = math.inf) -> float:
        """The aggregation weight of a site that trained on ``num_examples`` examples: the
        example count (as in FedAvg), capped at the run's public ``cap``."""
        return capped_weight(num_examples, cap)

    def init_state(self, global_state: State) -> StrategyState:
        """The per-cohort state before the first round (default: none)."""
        return {}

    @abstractmethod
    def step(self, cohort: str, round_: int, global_state: State, combined: Combined,
             state: StrategyState) -> tuple[dict[str, np.ndarray], StrategyState]:
        """The next global state and the next per-cohort state (see the module docstring)."""

    def combine(self, updates: Sequence[SiteUpdate], cap: float = math.inf) -> Combined:
        """What ``step`` receives from updates seen in the clear: the weighted mean (``"sum"``,
        weights ``weight(n, cap)``) or the updates sorted by site (``"each"``)."""
        if not updates:
            raise ValueError("no updates to aggregate")
        if self.needs == "each":
            return sorted(updates, key=lambda u: u.site)
        from .fedavg import weighted_mean

        return weighted_mean([replace(u, weight=self.weight(u.weight, cap)) for u in updates])

    def site_options(self) -> dict[str, float]:
        """What the sites' trainers need from this strategy (FedProx: ``proximal_mu``); default none."""
        return {}

    def options(self) -> dict[str, Any]:
        """The options this instance was built with (for the run record)."""
        return {p: getattr(self, p) for p in option_names(type(self))}

    def secure_refusal(self) -> str | None:
        """``None`` when the strategy composes with secure aggregation, else why it does not
        and which strategies do."""
        if self.needs == "sum":
            return None
        alternatives = "/".join(n for n, needs in available().items() if needs == "sum")
        return (f"{self.name} needs each site's update, which secure aggregation never reveals; "
                f"under secure aggregation use {alternatives}")

    @property
    def linear(self) -> bool:
        """Older name for ``needs == "sum"`` (composes with secure aggregation)."""
        return self.needs == "sum"

    # ---- the older one-call form ---------------------------------------------------
    def aggregate(self, global_state: State, updates: Sequence[SiteUpdate]) -> dict[str, np.ndarray]:
        """``combine`` then ``step`` with no state; refused for strategies that keep state
        (one call names no cohort, so it has nowhere to keep per-cohort moments)."""
        state = self.init_state(global_state)
        if state:
            raise FedloraError(f"strategy {self.name!r} keeps per-cohort state ({', '.join(sorted(state))}); "
                               "it needs step(cohort, round, ...), not aggregate(...)")
        return self.step("", 0, global_state, self.combine(updates), state)[0]

    def state_dict(self) -> dict[str, Any]:
        """Instance-level state for the older checkpoint format: always empty (per-cohort
        state lives in ``step``'s ``state``)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no instance state, but the checkpoint holds {sorted(state)}")


# ---- helpers for the rules ---------------------------------------------------------
def check_like(name: str, context: str, global_state: State, arrays: Mapping[str, Any], what: str) -> None:
    """``arrays`` has exactly the keys of ``global_state``, each of the same shape (``context``: see ``where``)."""
    if set(arrays) != set(global_state):
        missing, extra = sorted(set(global_state) - set(arrays)), sorted(set(arrays) - set(global_state))
        raise ValueError(f"{name}{context}: {what} does not match the global adapter's keys "
                         f"(missing {missing}, unexpected {extra})")
    for k, v in global_state.items():
        if np.shape(arrays[k]) != np.shape(v):
            raise ValueError(f"{name}{context}: {what} {k!r} has shape {np.shape(arrays[k])}, the global adapter {np.shape(v)}")


def where(cohort: str, round_: int) -> str:
    """`` (cohort 'x', round 3)`` for error messages; empty for the older one-call form."""
    return f" (cohort {cohort!r}, round {round_})" if cohort else ""


def require_state(name: str, cohort: str, round_: int, state: State, expected: Mapping[str, tuple[int, ...]]) -> None:
    """``state`` holds exactly the ``expected`` arrays (name -> shape): a checkpoint of another
    strategy or adapter is refused by name, never half-used."""
    if set(state) != set(expected):
        raise ValueError(f"{name}{where(cohort, round_)}: the strategy state holds {sorted(state)}, "
                         f"expected {sorted(expected)} (a state of another strategy or adapter?)")
    for k, shape in expected.items():
        if np.shape(state[k]) != tuple(shape):
            raise ValueError(f"{name}{where(cohort, round_)}: strategy state {k!r} has shape {np.shape(state[k])}, expected {tuple(shape)}")


def apply(global_state: State, change: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``theta + change`` per array, in float64, returned in each global array's dtype."""
    out = {}
    for k, v in global_state.items():
        g = np.asarray(v)
        out[k] = (g.astype(np.float64) + np.asarray(change[k], dtype=np.float64)).astype(g.dtype)
    return out


def as_mean(name: str, cohort: str, round_: int, global_state: State, combined: Combined) -> dict[str, np.ndarray]:
    """The ``"sum"`` strategies' ``combined``: the mean update as float64 arrays, checked against the adapter."""
    if not isinstance(combined, Mapping):
        raise TypeError(f"{name} needs the mean update (a mapping of arrays), got {type(combined).__name__}")
    check_like(name, where(cohort, round_), global_state, combined, "the mean update")
    return {k: np.asarray(v, dtype=np.float64) for k, v in combined.items()}


def as_each(name: str, cohort: str, round_: int, global_state: State, combined: Combined) -> list[SiteUpdate]:
    """The ``"each"`` strategies' ``combined``: a non-empty list of updates, each checked against the adapter."""
    if isinstance(combined, Mapping):
        raise TypeError(f"{name} needs each site's update (a list of SiteUpdate), got a mapping")
    updates = list(combined)
    if not updates:
        raise ValueError(f"{name}{where(cohort, round_)}: no updates to aggregate")
    for u in updates:
        check_like(name, where(cohort, round_), global_state, u.delta, f"site {u.site!r}'s update")
    return updates


def capped_weight(num_examples: float, cap: float = math.inf) -> float:
    """``min(n, cap)``: a site's aggregation weight under the public cap (``n`` finite, ``>= 0``)."""
    if not cap > 0:
        raise ValueError(f"the weight cap must be > 0, got {cap!r}")
    return min(_examples(num_examples), float(cap))


def site_weight(num_examples: float, cap: float) -> float:
    """``min(n, cap) / cap`` in ``[0, 1]``: what a site applies to its update before secure
    aggregation, so that the unmasked sum divided by its weight slot is the mean that
    ``combine`` forms in the clear with ``capped_weight``."""
    return capped_weight(num_examples, cap) / float(cap)


def _examples(num_examples: float) -> float:
    n = float(num_examples)
    if not (math.isfinite(n) and n >= 0):
        raise ValueError(f"a site's number of examples must be finite and >= 0, got {num_examples!r}")
    return n


# ---- option validation -------------------------------------------------------------
def real_option(strategy: str, option: str, value: object, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float within the stated range, or ``StrategyOptionError`` naming the option and the range."""
    lo = "-inf" if low is None else repr(float(low))
    hi = "inf" if high is None else repr(float(high))
    allowed = f"{'(' if low is None or low_open else '['}{lo}, {hi}{')' if high is None or high_open else ']'}"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        x = float(value)  # type: ignore[arg-type]
        ok = ((low is None or (x > low if low_open else x >= low))
              and (high is None or (x < high if high_open else x <= high)))
    if not ok:
        raise StrategyOptionError(f"strategy {strategy!r} option {option} = {value!r}: must be a number in {allowed}")
    return float(value)  # type: ignore[arg-type]


def int_option(strategy: str, option: str, value: object, *, low: int) -> int:
    """``value`` as an int ``>= low``, or ``StrategyOptionError`` naming the option."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise StrategyOptionError(f"strategy {strategy!r} option {option} = {value!r}: must be an integer >= {low}")
    return int(value)


def bool_option(strategy: str, option: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise StrategyOptionError(f"strategy {strategy!r} option {option} = {value!r}: must be true or false")
    return value


def option_names(cls: type[Strategy]) -> list[str]:
    """A strategy's options: the keyword parameters of its constructor."""
    return [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


# ---- the registry ------------------------------------------------------------------
def _registry() -> dict[str, type[Strategy]]:
    from .fedadagrad import FedAdagrad
    from .fedadam import FedAdam
    from .fedavg import FedAvg
    from .fedavgm import FedAvgM
    from .fedprox import FedProx
    from .fedyogi import FedYogi
    from .krum import Krum, MultiKrum
    from .median import CoordinateMedian
    from .trimmed_mean import TrimmedMean

    return {c.name: c for c in (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad,
                                CoordinateMedian, TrimmedMean, Krum, MultiKrum)}


def available() -> dict[str, Needs]:
    """Every registered strategy's name and what it needs (``"sum"`` or ``"each"``)."""
    return {name: cls.needs for name, cls in _registry().items()}


def get_strategy(name: str, **options: Any) -> Strategy:
    """The strategy registered under ``name``, built with ``options`` (its constructor's keyword
    parameters). An unknown name lists the known ones; an unknown option lists the allowed ones;
    a bad value names the option and its range."""
    known = _registry()
    if name not in known:
        raise StrategyOptionError(f"unknown strategy {name!r}; known: {', '.join(sorted(known))}")
    cls = known[name]
    allowed = option_names(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise StrategyOptionError(f"strategy {name!r} has no option {', '.join(unknown)}; "
                                  f"its options: {', '.join(allowed) or 'none'}")
    return cls(**options)
