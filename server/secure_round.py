"""The coordinator's side of secure aggregation: drive SecAgg+ stages 2-4 as Message rounds.

Stage 1 rides on the ``train`` (or ``evaluate``) messages: ``site_config`` adds the round's
graph and parameters; each site answers with its public keys instead of its update (or its
metrics). ``secure_sum`` then relays keys (``<kind>.secagg_share``), ciphertexts
(``<kind>.secagg_masked``) and the unmask request (``<kind>.secagg_unmask``) and returns the
cohort's unmasked sum (``train``: de-quantised; ``evaluate``: exact integer metrics). Sites
that fail or do not answer within the stage timeout count as dropped; below the threshold
the round aborts (``SecAggAbort``) and nothing is revealed: the cohort's adapter stays as it
was (or its metrics stay unknown).

Parameters: k neighbours (0: all others up to 8 sites, else the smallest even number >=
2 log2 n), threshold t (0: ceil(2 (k + 1) / 3), at least 2), modulus bits
``bits + ceil(log2(n + 1))`` so that n sites never overflow (checked).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from fedlora.config import SecureAggregationConfig
from fedlora.errors import ConfigError, FedloraError
from fedlora.model import derive_seed
from fedlora.privacy.quantization import Quantizer, wire_dtype
from fedlora.privacy.secagg import SecAggCoordinator, neighbours
from fedlora.privacy.secagg_vector import EVAL_MODULUS_BITS
from fedlora.protocol import MaskedAsk, ShareAsk, ShareReply, UnmaskAsk, UnmaskReply, arrays, read, record_of

log = logging.getLogger("fedlora.server")
Exchange = Callable[[list[Message]], dict[int, Message]]


def plan(cfg: SecureAggregationConfig, n: int) -> tuple[int, int, Quantizer]:
    """(k, t, quantiser) for a cohort of n sites; refuses a config that cannot work."""
    if cfg.neighbours:
        k = min(cfg.neighbours, n - 1)
    else:
        k = n - 1 if n <= 8 else min(n - 1, 2 * math.ceil(math.log2(n)))
        if k < n - 1 and k % 2:
            k += 1
    t = cfg.threshold or max(2, math.ceil(2 * (k + 1) / 3))
    if t > k + 1:
        raise ValueError(f"threshold {t} exceeds the {k + 1} shares of each secret (k = {k} neighbours + the site itself)")
    q = Quantizer(cfg.clip_range, cfg.bits, min(64, cfg.bits + math.ceil(math.log2(n + 1))))
    q.check_no_overflow(n)
    return k, t, q


def validate(cfg: SecureAggregationConfig, cohort_sizes: Mapping[str, int]) -> None:
    """Refuse, before any round, a secure-aggregation config that cannot work for a cohort
    that will use it (ConfigError naming the cohort)."""
    if not cfg.enabled:
        return
    for name, n in cohort_sizes.items():
        if n >= cfg.min_sites:
            try:
                plan(cfg, n)
            except ValueError as e:
                raise ConfigError("secure_aggregation", f"cohort {name} ({n} sites)", str(e)) from None


class SecureAggregation:
    def __init__(self, cfg: SecureAggregationConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self._rounds: dict[str, tuple[SecAggCoordinator, Quantizer | None]] = {}

    @staticmethod
    def round_id(cohort: str, round_: int, kind: str) -> str:
        return f"{cohort}/{round_}" if kind == "train" else f"{cohort}/{round_}/{kind}"

    def site_config(self, cohort: str, nodes: list[int], round_: int, kind: str = "train") -> dict[int, dict[str, Any]]:
        """Per site, what it needs for one protocol instance (record ``secagg`` of its message):
        round id, its own neighbours, threshold, modulus (and for ``train`` the quantiser).
        ``evaluate`` sums exact integers modulo 2^64."""
        k, t, q = plan(self.cfg, len(nodes))
        round_id = self.round_id(cohort, round_, kind)
        graph = neighbours(nodes, k, random.Random(derive_seed(self.seed, "secagg-graph", round_id)))
        bits = q.modulus_bits if kind == "train" else EVAL_MODULUS_BITS
        self._rounds[round_id] = (SecAggCoordinator(graph, t, bits, round_id), q if kind == "train" else None)
        shared: dict[str, Any] = {"round_id": round_id, "threshold": t, "modulus_bits": bits}
        if kind == "train":
            shared |= {"bits": q.bits, "clip_range": float(q.clip_range), "weight_scale": float(self.cfg.weight_scale)}
        return {u: shared | {"neighbours": list(graph[u])} for u in nodes}

    def setup(self, cohort: str, nodes: list[int], round_: int, kind: str) -> dict[int, dict[str, Any]] | None:
        """``site_config``, or None when the sampled sites are too few (fewer than ``min_sites``
        or than the threshold needs): then the cohort sits the round out rather than send
        anything in the clear."""
        try:
            if len(nodes) < self.cfg.min_sites:
                raise ValueError(f"only {len(nodes)} site(s) sampled, fewer than secure_aggregation.min_sites = {self.cfg.min_sites}")
            return self.site_config(cohort, nodes, round_, "train" if kind == "train" else "evaluate")
        except ValueError as e:
            log.warning("round %d: cohort %r sits out this %s round: %s", round_, cohort, kind, e)
            return None

    def secure_sum(self, exchange: Exchange, cohort: str, round_: int, advertised: Mapping[int, tuple[bytes, bytes]],
                   kind: str = "train") -> tuple[np.ndarray, list[int], Quantizer | None]:
        """Stages 2-4 over the sites that advertised keys: the unmasked sum (integers modulo
        2^m), the survivors, and the quantiser to read a ``train`` sum with. Keys, ciphertexts
        and shares travel as lists of raw bytes in the record ``secagg``."""
        round_id = self.round_id(cohort, round_, kind)
        coord, q = self._rounds.pop(round_id)

        def stage(name: str, asks: Mapping[int, Any]) -> dict[int, RecordDict]:
            msgs = [Message(RecordDict({"secagg": record_of(a)}), node, f"{kind}.{name}", group_id=str(round_)) for node, a in asks.items()]
            return {n: r.content for n, r in exchange(msgs).items() if not r.has_error()}

        def readable(got: Mapping[int, RecordDict], fn: Callable[[RecordDict], Any], name: str) -> dict[int, Any]:
            """Each reply read through the protocol; a malformed one counts as a dropout, named in the log."""
            out = {}
            for u, c in got.items():
                try:
                    out[u] = fn(c)
                except (FedloraError, ValueError) as e:
                    log.warning("round %d: a malformed %s reply from node %s counts as a dropout: %s", round_, name, u, e)
            return out

        relayed = coord.relay_keys(dict(advertised))
        got = readable(stage("secagg_share", {u: ShareAsk(round_id=round_id, peers=tuple(ks), c_pk=tuple(c for c, _ in ks.values()),
                                                          s_pk=tuple(s for _, s in ks.values())) for u, ks in relayed.items()}),
                       lambda c: read(ShareReply, c, f"{kind}.secagg_share"), "secagg_share")
        sent = {u: dict(zip(r.peers, r.ciphertexts, strict=True)) for u, r in got.items()}
        inbox = coord.relay_shares(sent)
        wire = wire_dtype(coord.modulus_bits).name
        got = readable(stage("secagg_masked", {u: MaskedAsk(round_id=round_id, peers=tuple(box), ciphertexts=tuple(box.values()),
                                                            wire_dtype=wire) for u, box in inbox.items()}),
                       lambda c: np.frombuffer(arrays(c, "masked", f"{kind}.secagg_masked")["y"].data, dtype=np.dtype(wire).newbyteorder("<")),
                       "secagg_masked")
        masked = dict(got)
        survivors, dropped = coord.unmask_request(masked)
        got = readable(stage("secagg_unmask", {u: UnmaskAsk(round_id=round_id, survivors=tuple(survivors), dropped=tuple(dropped))
                                               for u in survivors}),
                       lambda c: read(UnmaskReply, c, f"{kind}.secagg_unmask"), "secagg_unmask")
        responses = {u: {p: (k, (x, y)) for p, k, x, y in zip(r.peers, r.kinds, r.x, r.y, strict=True)} for u, r in got.items()}
        return coord.aggregate(masked, responses), survivors, q
