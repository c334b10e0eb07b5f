"""A site's side of secure aggregation: the SecAgg+ stages as ClientApp handlers.

Stage 1 runs inside ``train`` (after local training) or ``evaluate``: the site turns its
update (``train_vector``) or its metrics (``eval_vector``) into the integers it will mask
(``fedlora.privacy.secagg_vector``), keeps them and its protocol secrets in its node state
(record ``fedlora.secagg``; nothing secret leaves the site), and replies with its two public
keys instead of the update or the metrics. ``<kind>.secagg_share``, ``<kind>.secagg_masked``
and ``<kind>.secagg_unmask`` carry stages 2-4.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from fedlora.errors import FedloraError
from fedlora.privacy.quantization import Quantizer
from fedlora.privacy.secagg import SecAggAbort, SecAggSite, UnmaskRefused, site_from_json, site_to_json
from fedlora.privacy.secagg_vector import eval_vector, site_vector, site_weight

STATE_KEY = "fedlora.secagg"
MASKED_STYPE = "fedlora.masked"


def quantizer(setup: Mapping[str, Any]) -> Quantizer:
    return Quantizer(float(setup["clip_range"]), int(setup["bits"]), int(setup["modulus_bits"]))


def train_vector(setup: Mapping[str, Any], delta: Mapping[str, np.ndarray], examples: int, loss: float,
                 weight: float | None = None, unclipped: int = 0) -> np.ndarray:
    """The update, weighted (``w = min(1, n / weight_scale)`` unless ``weight`` is given) and
    quantised as the round's config says."""
    w = site_weight(examples, float(setup["weight_scale"])) if weight is None else weight
    return site_vector(delta, w, loss, quantizer(setup), unclipped)[0]


def metrics_vector(loss: float, accuracy: float, examples: int, label_counts: list[int]) -> np.ndarray:
    return eval_vector(loss, int(round(accuracy * examples)), examples, label_counts)


def begin(ctx: Context, setup: Mapping[str, Any], vector: np.ndarray) -> RecordDict:
    """Stage 1: keep the masked-to-be vector and fresh secrets; reply with the public keys.
    ``setup`` is the message's record ``secagg``: round id, this site's neighbours, threshold,
    modulus bits."""
    node = int(ctx.node_id)
    peers = [int(p) for p in setup["neighbours"]]
    if node in peers:
        raise FedloraError(f"secure aggregation: this site (node {node}) is named among its own neighbours")
    site = SecAggSite(node, peers, int(setup["threshold"]), int(setup["modulus_bits"]), str(setup["round_id"]))
    vector = np.asarray(vector)
    if vector.dtype.kind != "u":
        raise FedloraError(f"secure aggregation: the vector to mask must hold unsigned integers, got {vector.dtype}")
    ctx.state[STATE_KEY] = ConfigRecord({"site": site_to_json(site), "vector": vector.tobytes(), "dtype": vector.dtype.str,
                                         "round_id": str(setup["round_id"])})
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
    ctx.state[STATE_KEY] = ConfigRecord({"site": site_to_json(site), "vector": rec["vector"], "dtype": rec["dtype"],
                                         "round_id": rec["round_id"]})


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
    req = content["secagg"]
    keys = {int(p): (bytes(c), bytes(s)) for p, c, s in zip(req["peers"], req["c_pk"], req["s_pk"], strict=True)}
    boxes = site.share_keys(keys)
    _save(ctx, site, rec)
    return RecordDict({"secagg": ConfigRecord({"peers": list(boxes), "ciphertexts": list(boxes.values())})})


@_protocol
def masked(ctx: Context, content: RecordDict) -> RecordDict:
    """Stage 3: decrypt the neighbours' shares, send the masked vector in the smallest wire type."""
    site, rec = _load(ctx, content)
    req = content["secagg"]
    site.receive_shares({int(p): bytes(b) for p, b in zip(req["peers"], req["ciphertexts"], strict=True)})
    y = site.masked_input(np.frombuffer(rec["vector"], dtype=np.dtype(str(rec["dtype"]))))
    _save(ctx, site, rec)
    wire = np.dtype(str(req["wire_dtype"])).newbyteorder("<")
    arr = Array(dtype=wire.name, shape=(len(y),), stype=MASKED_STYPE, data=y.astype(wire, copy=False).tobytes())
    return RecordDict({"masked": ArrayRecord({"y": arr})})


@_protocol
def unmask(ctx: Context, content: RecordDict) -> RecordDict:
    """Stage 4: the b share of each surviving neighbour, the key share of each dropped one."""
    site, rec = _load(ctx, content)
    req = content["secagg"]
    shares = site.unmask([int(u) for u in req["survivors"]], [int(u) for u in req["dropped"]])
    _save(ctx, site, rec)
    peers = list(shares)
    return RecordDict({"secagg": ConfigRecord({"peers": peers, "kinds": [shares[p][0] for p in peers],
                                               "x": [shares[p][1][0] for p in peers], "y": [shares[p][1][1] for p in peers]})})
