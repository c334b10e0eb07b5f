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
from fedlora.privacy.secagg_vector import EVAL_LOSS_SCALE, eval_vector, site_vector, site_weight
from fedlora.protocol import MaskedAsk, SecAggKeys, SecAggSetup, ShareAsk, ShareReply, UnmaskAsk, UnmaskReply, read, record_of

STATE_KEY = "fedlora.secagg"
MASKED_STYPE = "fedlora.masked"


def quantizer(setup: SecAggSetup) -> Quantizer:
    if setup.clip_range is None or setup.bits is None:
        raise FedloraError("secure aggregation: the train setup lacks the quantiser (clip_range, bits)")
    return Quantizer(float(setup.clip_range), int(setup.bits), int(setup.modulus_bits))


def train_vector(setup: SecAggSetup, delta: Mapping[str, np.ndarray], examples: int, loss: float,
                 weight: float | None = None, unclipped: int = 0) -> np.ndarray:
    """The update, weighted (``w = min(1, n / weight_scale)`` unless ``weight`` is given) and
    quantised as the round's config says."""
    if weight is None and setup.weight_scale is None:
        raise FedloraError("secure aggregation: the train setup lacks weight_scale")
    w = site_weight(examples, float(setup.weight_scale)) if weight is None else weight
    return site_vector(delta, w, loss, quantizer(setup), unclipped)[0]


def metrics_vector(loss: float, accuracy: float, examples: int, label_counts: list[int]) -> np.ndarray:
    return eval_vector(loss, int(round(accuracy * examples)), examples, label_counts)


def begin(ctx: Context, setup: SecAggSetup, vector: np.ndarray) -> RecordDict:
    """Stage 1: keep the masked-to-be vector and fresh secrets; reply with the public keys.
    ``setup`` is the message's record ``secagg``: round id, this site's neighbours, threshold,
    modulus bits."""
    node = int(ctx.node_id)
    peers = list(setup.neighbours)
    if node in peers:
        raise FedloraError(f"secure aggregation: this site (node {node}) is named among its own neighbours")
    site = SecAggSite(node, peers, setup.threshold, setup.modulus_bits, setup.round_id)
    vector = np.asarray(vector)
    if vector.dtype.kind != "u":
        raise FedloraError(f"secure aggregation: the vector to mask must hold unsigned integers, got {vector.dtype}")
    ctx.state[STATE_KEY] = ConfigRecord({"site": site_to_json(site), "vector": vector.tobytes(), "dtype": vector.dtype.str,
                                         "round_id": setup.round_id})
    c_pk, s_pk = site.advertise()
    return RecordDict({SecAggKeys.record: record_of(SecAggKeys(c_pk=c_pk, s_pk=s_pk))})


def _load(ctx: Context, round_id: str) -> tuple[SecAggSite, ConfigRecord]:
    if STATE_KEY not in ctx.state:
        raise FedloraError("secure aggregation: no protocol state at this site (it did not train this round)")
    rec = ctx.state[STATE_KEY]
    if str(rec["round_id"]) != round_id:
        raise FedloraError(f"secure aggregation: asked about round {round_id}, but this site holds round {rec['round_id']}")
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
    req = read(ShareAsk, content, "secagg_share")
    site, rec = _load(ctx, req.round_id)
    keys = {p: (c, s) for p, c, s in zip(req.peers, req.c_pk, req.s_pk, strict=True)}
    boxes = site.share_keys(keys)
    _save(ctx, site, rec)
    return RecordDict({ShareReply.record: record_of(ShareReply(peers=tuple(boxes), ciphertexts=tuple(boxes.values())))})


@_protocol
def masked(ctx: Context, content: RecordDict) -> RecordDict:
    """Stage 3: decrypt the neighbours' shares, send the masked vector in the smallest wire type."""
    req = read(MaskedAsk, content, "secagg_masked")
    site, rec = _load(ctx, req.round_id)
    site.receive_shares({p: b for p, b in zip(req.peers, req.ciphertexts, strict=True)})
    y = site.masked_input(np.frombuffer(rec["vector"], dtype=np.dtype(str(rec["dtype"]))))
    _save(ctx, site, rec)
    wire = np.dtype(req.wire_dtype).newbyteorder("<")
    arr = Array(dtype=wire.name, shape=(len(y),), stype=MASKED_STYPE, data=y.astype(wire, copy=False).tobytes())
    return RecordDict({"masked": ArrayRecord({"y": arr})})


@_protocol
def unmask(ctx: Context, content: RecordDict) -> RecordDict:
    """Stage 4: the b share of each surviving neighbour, the key share of each dropped one."""
    req = read(UnmaskAsk, content, "secagg_unmask")
    site, rec = _load(ctx, req.round_id)
    shares = site.unmask(list(req.survivors), list(req.dropped))
    _save(ctx, site, rec)
    peers = tuple(shares)
    return RecordDict({UnmaskReply.record: record_of(UnmaskReply(peers=peers, kinds=tuple(shares[p][0] for p in peers),
                                                                 x=tuple(shares[p][1][0] for p in peers),
                                                                 y=tuple(shares[p][1][1] for p in peers)))})
