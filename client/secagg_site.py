"""A site's side of secure aggregation: the SecAgg+ stages as ClientApp handlers.

Stage 1 runs inside ``train`` (after local training): the site turns its update into the
integers it will mask (``fedlora.privacy.secagg_vector``), keeps them and its protocol
secrets in its node state (record ``fedlora.secagg``; nothing secret leaves the site), and
replies with its two public keys instead of the update. ``train.secagg_share``,
``train.secagg_masked`` and ``train.secagg_unmask`` carry stages 2-4.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from fedlora.errors import FedloraError
from fedlora.privacy.quantization import Quantizer
from fedlora.privacy.secagg import SecAggAbort, SecAggSite, UnmaskRefused, site_from_json, site_to_json
from fedlora.privacy.secagg_vector import site_vector, site_weight

STATE_KEY = "fedlora.secagg"
MASKED_STYPE = "fedlora.masked"


def quantizer(cfg: Mapping[str, Any]) -> Quantizer:
    return Quantizer(float(cfg["secagg.clip_range"]), int(cfg["secagg.bits"]), int(cfg["secagg.modulus_bits"]))


def begin(ctx: Context, cfg: Mapping[str, Any], delta: Mapping[str, np.ndarray], examples: int, loss: float,
          weight: float | None = None) -> RecordDict:
    """Stage 1: keep the masked-to-be vector and fresh secrets; reply with the public keys."""
    graph = json.loads(str(cfg["secagg.graph"]))
    node = int(ctx.node_id)
    if str(node) not in graph:
        raise FedloraError(f"secure aggregation: this site (node {node}) is not in the round's graph")
    q = quantizer(cfg)
    w = site_weight(examples, float(cfg["secagg.weight_scale"])) if weight is None else weight
    vector, clipped = site_vector(delta, w, loss, q)
    site = SecAggSite(node, [int(p) for p in graph[str(node)]], int(cfg["secagg.threshold"]), q.modulus_bits, str(cfg["secagg.round_id"]))
    ctx.state[STATE_KEY] = ConfigRecord({"site": site_to_json(site), "vector": vector.tobytes(), "round_id": str(cfg["secagg.round_id"])})
    c_pk, s_pk = site.advertise()
    return RecordDict({"secagg": ConfigRecord({"c_pk": c_pk, "s_pk": s_pk})})


def _load(ctx: Context, content: RecordDict) -> tuple[SecAggSite, ConfigRecord]:
    if STATE_KEY not in ctx.state:
        raise FedloraError("secure aggregation: no protocol state at this site (it did not train this round)")
    rec = ctx.state[STATE_KEY]
    if str(rec["round_id"]) != str(content["secagg"]["round_id"]):
        raise FedloraError(f"secure aggregation: asked about round {content['secagg']['round_id']}, but this site holds "
                           f"round {rec['round_id']}")
    return site_from_json(str(rec["site"])), rec


def _save(ctx: Context, site: SecAggSite, rec: ConfigRecord) -> None:
    ctx.state[STATE_KEY] = ConfigRecord({"site": site_to_json(site), "vector": rec["vector"], "round_id": rec["round_id"]})


def _protocol(fn):
    @functools.wraps(fn)
    def run(ctx: Context, content: RecordDict) -> RecordDict:
        try:
            return fn(ctx, content)
        except (SecAggAbort, UnmaskRefused) as e:
            raise FedloraError(f"secure aggregation: {e}") from None
    return run


@_protocol
def share(ctx: Context, content: RecordDict) -> RecordDict:
    """Stage 2: encrypted share pairs for the neighbours whose keys the coordinator relayed."""
    site, rec = _load(ctx, content)
    keys = {int(p): (bytes.fromhex(c), bytes.fromhex(s)) for p, (c, s) in json.loads(str(content["secagg"]["keys"])).items()}
    boxes = site.share_keys(keys)
    _save(ctx, site, rec)
    return RecordDict({"secagg": ConfigRecord({"ciphertexts": json.dumps({str(p): b.hex() for p, b in boxes.items()})})})


@_protocol
def masked(ctx: Context, content: RecordDict) -> RecordDict:
    """Stage 3: decrypt the neighbours' shares, send the masked vector in the smallest wire type."""
    site, rec = _load(ctx, content)
    site.receive_shares({int(p): bytes.fromhex(b) for p, b in json.loads(str(content["secagg"]["ciphertexts"])).items()})
    y = site.masked_input(np.frombuffer(rec["vector"], dtype=np.uint64))
    _save(ctx, site, rec)
    wire = np.dtype(str(content["secagg"]["wire_dtype"])).newbyteorder("<")
    arr = Array(dtype=wire.name, shape=(len(y),), stype=MASKED_STYPE, data=y.astype(wire).tobytes())
    return RecordDict({"masked": ArrayRecord({"y": arr})})


@_protocol
def unmask(ctx: Context, content: RecordDict) -> RecordDict:
    """Stage 4: the b share of each surviving neighbour, the key share of each dropped one."""
    site, rec = _load(ctx, content)
    req = content["secagg"]
    shares = site.unmask([int(u) for u in json.loads(str(req["survivors"]))], [int(u) for u in json.loads(str(req["dropped"]))])
    _save(ctx, site, rec)
    return RecordDict({"secagg": ConfigRecord({"shares": json.dumps({str(p): [kind, x, y.hex()] for p, (kind, (x, y)) in shares.items()})})})
