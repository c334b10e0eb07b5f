"""The coordinator's side of secure aggregation: drive SecAgg+ stages 2-4 as Message rounds.

Stage 1 rides on the ``train`` messages (``site_config`` adds the round's graph and
parameters; each site answers with its public keys instead of its update). ``secure_sum``
then relays keys (``train.secagg_share``), ciphertexts (``train.secagg_masked``) and the
unmask request (``train.secagg_unmask``) and returns the cohort's unmasked, de-quantised sum.
Sites that fail or do not answer in a stage count as dropped; below the threshold the round
aborts (``SecAggAbort``) and the cohort's adapter stays as it was.

Parameters: k neighbours (0: all others up to 8 sites, else the smallest even number >=
2 log2 n), threshold t (0: ceil(2 (k + 1) / 3), at least 2), modulus bits
``bits + ceil(log2(n + 1))`` so that n sites never overflow (checked).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from fedlora.config import SecureAggregationConfig
from fedlora.model import derive_seed
from fedlora.privacy.quantization import Quantizer
from fedlora.privacy.secagg import SecAggCoordinator, neighbours
from fedlora.privacy.secagg_vector import AggregateSum, read_sum

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


class SecureAggregation:
    def __init__(self, cfg: SecureAggregationConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self._rounds: dict[str, tuple[SecAggCoordinator, Quantizer]] = {}

    def site_config(self, cohort: str, nodes: list[int], round_: int) -> dict[str, Any]:
        k, t, q = plan(self.cfg, len(nodes))
        round_id = f"{cohort}/{round_}"
        graph = neighbours(nodes, k, random.Random(derive_seed(self.seed, "secagg-graph", round_id)))
        self._rounds[round_id] = (SecAggCoordinator(graph, t, q.modulus_bits, round_id), q)
        return {"secagg.enabled": True, "secagg.round_id": round_id, "secagg.graph": json.dumps({str(u): v for u, v in graph.items()}),
                "secagg.threshold": t, "secagg.bits": q.bits, "secagg.modulus_bits": q.modulus_bits,
                "secagg.clip_range": float(q.clip_range), "secagg.weight_scale": float(self.cfg.weight_scale)}

    def secure_sum(self, exchange: Exchange, cohort: str, round_: int, advertised: Mapping[int, tuple[bytes, bytes]],
                   shapes: Mapping[str, tuple[int, ...]]) -> tuple[AggregateSum, list[int]]:
        """Stages 2-4 over the sites that advertised keys; returns the sum and the survivors."""
        round_id = f"{cohort}/{round_}"
        coord, q = self._rounds.pop(round_id)

        def stage(kind: str, payloads: Mapping[int, dict[str, Any]]) -> dict[int, Message]:
            msgs = [Message(RecordDict({"secagg": ConfigRecord({"round_id": round_id, **p})}), node, f"train.{kind}", group_id=str(round_))
                    for node, p in payloads.items()]
            return {n: r for n, r in exchange(msgs).items() if not r.has_error()}

        relayed = coord.relay_keys(dict(advertised))
        got = stage("secagg_share", {u: {"keys": json.dumps({str(p): [c.hex(), s.hex()] for p, (c, s) in ks.items()})}
                                     for u, ks in relayed.items()})
        sent = {u: {int(p): bytes.fromhex(b) for p, b in json.loads(str(r.content["secagg"]["ciphertexts"])).items()} for u, r in got.items()}
        inbox = coord.relay_shares(sent)
        wire = q.wire_dtype.name
        got = stage("secagg_masked", {u: {"ciphertexts": json.dumps({str(p): b.hex() for p, b in box.items()}), "wire_dtype": wire}
                                      for u, box in inbox.items()})
        masked = {u: np.frombuffer(r.content["masked"]["y"].data, dtype=np.dtype(wire).newbyteorder("<")).astype(np.uint64)
                  for u, r in got.items()}
        survivors, dropped = coord.unmask_request(masked)
        got = stage("secagg_unmask", {u: {"survivors": json.dumps(survivors), "dropped": json.dumps(dropped)} for u in survivors})
        responses = {u: {int(p): (kind, (int(x), bytes.fromhex(y))) for p, (kind, x, y) in json.loads(str(r.content["secagg"]["shares"])).items()}
                     for u, r in got.items()}
        total = coord.aggregate(masked, responses)
        return read_sum(total, shapes, q), survivors


