"""A site's side of secure aggregation: the SecAgg+ stages as ClientApp handlers.

Stage 1 runs inside ``train`` (after local training) or ``evaluate``: the site turns its
update (``train_vector``) or its metrics (``eval_vector``) into the integers it will mask
(``fedlora.privacy.secagg_vector``), keeps them and its protocol secrets in its node state
(record ``fedlora.secagg``; nothing secret leaves the site), and replies with its two public
keys instead of the update or the metrics. ``<kind>.secagg_share``, ``<kind>.secagg_masked``
and ``<kind>.secagg_unmask`` carry stages 2-4.

Against an active coordinator every refusal below is a ``FedloraError`` naming the problem,
raised before anything is revealed (no keys, no shares, no masked vector):

* stage 1: the group and threshold (``fedlora.privacy.secagg.check_parameters``);
* stage 1: this site's own signing material, when it has some, that its peers would refuse
  (``fedlora.privacy.key_signing.check_own``);
* stage 2: the relayed keys (``SecAggSite.check_relayed``), a peer named twice; and, when the
  site has the federation CA (``Credentials.ca``), any peer key that is unsigned, badly
  signed, signed for another round or sum, under a certificate not issued by the CA (or
  expired, or not a site's), or whose certified name repeats another peer's or is this site's
  own (``key_signing.verify_peers``);
* stage 3: fewer than t - 1 neighbours' shares (``SecAggSite.masked_input``);
* replay (stages 1 and 3): a site sends at most one masked input per secure sum. It keeps,
  in its node state (record ``fedlora.secagg.sent``), the round ids and the ``(cohort,
  round, kind)`` it has sent a masked input for, and refuses a second sum for either, so two
  sums over different survivors never difference out its vector; and it never masks the
  same train vector twice (its SHA-256, kept also in ``<state_dir>/secagg_sent.json`` so
  that a new run, whose node state starts empty, cannot replay the DP release cache's
  update into a second sum). ``train`` and ``evaluate`` of one round are two sums (the kind
  differs). A coordinator that restarts and re-asks a round whose masked input this site
  already sent is refused; one whose masked input it never sent gets an answer.

Authenticated keys (``fedlora.privacy.key_signing``). A site with a key and certificate signs
its two public keys, bound to the round id, its sum (cohort, round, kind) and its name, and
sends the signature and certificate beside them (``SecAggKeys``). Policy: a site that has the
CA requires every peer's keys signed and refuses the stage otherwise; a site without the CA
(an old configuration) takes keys as relayed, as before, and logs a warning that the
coordinator could substitute them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from fedlora.errors import FedloraError
from fedlora.files import write_text_atomic
from fedlora.privacy import key_signing
from fedlora.privacy.key_signing import Credentials, KeyAuthError, KeyContext, SignedKeys
from fedlora.privacy.quantization import Quantizer
from fedlora.privacy.secagg import SecAggAbort, SecAggSite, UnmaskRefused, check_parameters, site_from_json, site_to_json
from fedlora.privacy.secagg_vector import EVAL_LOSS_SCALE, eval_vector, site_vector, site_weight
from fedlora.protocol import MaskedAsk, SecAggKeys, SecAggSetup, ShareAsk, ShareReply, UnmaskAsk, UnmaskReply, read, record_of

STATE_KEY = "fedlora.secagg"
SENT_KEY = "fedlora.secagg.sent"
SENT_FILE = "secagg_sent.json"
MASKED_STYPE = "fedlora.masked"
KINDS = ("train", "evaluate")
log = logging.getLogger("fedlora.client")
_WARNED: set[str] = set()  # sites already warned that their peers' keys go unauthenticated


@dataclass(frozen=True)
class SumOf:
    """What a secure sum is for, as the site itself knows it: its own cohort, the round the
    plan names, and the kind of the handler that was called (``train`` or ``evaluate``),
    not anything the coordinator writes into ``SecAggSetup.round_id``."""

    cohort: str
    round: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FedloraError(f"secure aggregation: a sum of kind {self.kind!r}, not one of {KINDS}")

    def key(self) -> str:
        return json.dumps([self.cohort, int(self.round), self.kind])


def vector_digest(vector: np.ndarray) -> str:
    """SHA-256 of a vector to mask (its dtype and bytes): the same update, recognised."""
    v = np.ascontiguousarray(vector)
    return hashlib.sha256(v.dtype.str.encode() + b"\0" + v.tobytes()).hexdigest()


@dataclass
class SentSums:
    """The secure sums this site has sent a masked input to: round ids and sums (this run's
    node state) and train-vector digests (also ``<state_dir>/secagg_sent.json``, all runs)."""

    round_ids: set[str] = field(default_factory=set)
    sums: set[str] = field(default_factory=set)
    digests: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, ctx: Context, state_dir: str | Path | None) -> "SentSums":
        doc = json.loads(str(ctx.state[SENT_KEY]["doc"])) if SENT_KEY in ctx.state else {}
        out = cls(set(doc.get("round_ids", [])), set(doc.get("sums", [])), set(doc.get("digests", [])))
        path = _sent_file(state_dir)
        if path is not None and path.is_file():
            out.digests |= set(json.loads(path.read_text(encoding="utf-8")).get("digests", []))
        return out

    def problem(self, round_id: str, sum_of: SumOf | None, digest: str | None) -> str:
        """Why a masked input for this sum must not be sent ('' if it may)."""
        if round_id in self.round_ids:
            return f"this site already sent a masked input for round id {round_id!r}; a second sum would difference it out"
        if sum_of is not None and sum_of.key() in self.sums:
            return (f"this site already sent a masked input for cohort {sum_of.cohort!r} round {sum_of.round} ({sum_of.kind}); "
                    f"refusing a second one under round id {round_id!r}")
        if digest is not None and digest in self.digests:
            return (f"this site already sent exactly this update (sha256 {digest[:16]}...) into a secure sum; refusing it into a "
                    f"second one (round id {round_id!r})")
        return ""

    def add(self, round_id: str, sum_of: SumOf | None, digest: str | None) -> None:
        self.round_ids.add(round_id)
        if sum_of is not None:
            self.sums.add(sum_of.key())
        if digest is not None:
            self.digests.add(digest)

    def save(self, ctx: Context, state_dir: str | Path | None) -> None:
        doc = {"round_ids": sorted(self.round_ids), "sums": sorted(self.sums), "digests": sorted(self.digests)}
        ctx.state[SENT_KEY] = ConfigRecord({"doc": json.dumps(doc)})
        path = _sent_file(state_dir)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps({"digests": doc["digests"]}))


def _sent_file(state_dir: str | Path | None) -> Path | None:
    return Path(state_dir) / SENT_FILE if state_dir else None


def _refuse_replay(ctx: Context, state_dir: str | Path | None, round_id: str, sum_of: SumOf | None, digest: str | None) -> None:
    why = SentSums.load(ctx, state_dir).problem(round_id, sum_of, digest)
    if why:
        raise FedloraError(f"secure aggregation: {why}")


def _unique(peers: Sequence[int], what: str) -> None:
    repeated = sorted({p for p in peers if list(peers).count(p) > 1})
    if repeated:
        raise FedloraError(f"secure aggregation: the {what} names peers {repeated} more than once")


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


def key_context(round_id: str, sum_of: SumOf | None) -> KeyContext:
    """What this site's signature is bound to, and what it checks its peers' against."""
    if sum_of is None:
        return KeyContext(round_id)
    return KeyContext(round_id, sum_of.cohort, int(sum_of.round), sum_of.kind)


def _signed_keys(creds: Credentials | None, context: KeyContext, c_pk: bytes, s_pk: bytes) -> SecAggKeys:
    """The stage-1 reply: the keys, signed when the site can sign (its own material checked
    first, ``key_signing.check_own``); a warning when it will not check its peers' keys."""
    if creds is None or not creds.verifies:
        who = creds.name if creds is not None else "(unnamed)"
        if who not in _WARNED:
            _WARNED.add(who)
            log.warning("site %s: no federation CA for secure aggregation: its peers' keys are not authenticated, so the "
                        "coordinator could substitute them and unmask this site's input (give the site its certificate and "
                        "the CA: fedlora certs writes <site>.crt)", who)
    if creds is None or not creds.signs:
        if creds is not None and creds.verifies and f"unsigned:{creds.name}" not in _WARNED:
            _WARNED.add(f"unsigned:{creds.name}")
            log.warning("site %s: no signing key and certificate: its SecAgg keys go unsigned, and peers that check "
                        "signatures will refuse them", creds.name)
        return SecAggKeys(c_pk=c_pk, s_pk=s_pk)
    try:
        key, cert = key_signing.check_own(creds)
    except KeyAuthError as e:
        raise FedloraError(f"secure aggregation: {e}") from None
    return SecAggKeys(c_pk=c_pk, s_pk=s_pk, sig=key_signing.sign_keys(key, context, creds.name, c_pk, s_pk),
                      cert=key_signing.der(cert))


def begin(ctx: Context, setup: SecAggSetup, vector: np.ndarray, *, sum_of: SumOf | None = None,
          state_dir: str | Path | None = None, credentials: Credentials | None = None) -> RecordDict:
    """Stage 1: keep the masked-to-be vector and fresh secrets; reply with the public keys.
    ``setup`` is the message's record ``secagg``: round id, this site's neighbours, threshold,
    modulus bits. ``sum_of`` (what the site knows the sum is for) and ``state_dir`` (where the
    site keeps its state across runs) arm the replay checks beyond the round id.
    ``credentials``: the site's signing material; with a key and certificate the keys go out
    signed, with the CA stage 2 will require its peers' keys signed (module docstring).

    Refuses (``FedloraError``, nothing revealed) a group or threshold below the site's floor
    (``check_parameters``), a second sum this site already sent a masked input for (same
    round id, same ``sum_of``, or, except for ``evaluate``, the same vector), and signing
    material of its own that does not fit together (``key_signing.check_own``)."""
    node = int(ctx.node_id)
    peers = list(setup.neighbours)
    try:
        check_parameters(node, peers, int(setup.threshold))
    except SecAggAbort as e:
        raise FedloraError(f"secure aggregation: {e}") from None
    vector = np.asarray(vector)
    if vector.dtype.kind != "u":
        raise FedloraError(f"secure aggregation: the vector to mask must hold unsigned integers, got {vector.dtype}")
    digest = None if sum_of is not None and sum_of.kind == "evaluate" else vector_digest(vector)
    _refuse_replay(ctx, state_dir, setup.round_id, sum_of, digest)
    site = SecAggSite(node, peers, setup.threshold, setup.modulus_bits, setup.round_id)
    c_pk, s_pk = site.advertise()
    keys = _signed_keys(credentials, key_context(setup.round_id, sum_of), c_pk, s_pk)
    ctx.state[STATE_KEY] = ConfigRecord({"site": site_to_json(site), "vector": vector.tobytes(), "dtype": vector.dtype.str,
                                         "round_id": setup.round_id, "sum_of": "" if sum_of is None else sum_of.key(),
                                         "digest": digest or "", "state_dir": str(state_dir or ""),
                                         "ca": credentials.ca if credentials is not None else "",
                                         "name": credentials.name if credentials is not None else ""})
    return RecordDict({SecAggKeys.record: record_of(keys)})


def _load(ctx: Context, round_id: str) -> tuple[SecAggSite, ConfigRecord]:
    if STATE_KEY not in ctx.state:
        raise FedloraError("secure aggregation: no protocol state at this site (it did not train this round)")
    rec = ctx.state[STATE_KEY]
    if str(rec["round_id"]) != round_id:
        raise FedloraError(f"secure aggregation: asked about round {round_id}, but this site holds round {rec['round_id']}")
    return site_from_json(str(rec["site"])), rec


def _save(ctx: Context, site: SecAggSite, rec: ConfigRecord) -> None:
    ctx.state[STATE_KEY] = ConfigRecord({**dict(rec), "site": site_to_json(site)})


def _sum_of(rec: ConfigRecord) -> SumOf | None:
    text = str(rec.get("sum_of", ""))
    return SumOf(*json.loads(text)) if text else None


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
    """Stage 2: encrypted share pairs for the neighbours whose keys the coordinator relayed.
    With the CA (kept from stage 1) every relayed key must verify first (``_authenticate``)."""
    req = read(ShareAsk, content, "secagg_share")
    site, rec = _load(ctx, req.round_id)
    _unique(req.peers, "relayed key list")
    _authenticate(req, rec)
    keys = {p: (c, s) for p, c, s in zip(req.peers, req.c_pk, req.s_pk, strict=True)}
    boxes = site.share_keys(keys)
    _save(ctx, site, rec)
    return RecordDict({ShareReply.record: record_of(ShareReply(peers=tuple(boxes), ciphertexts=tuple(boxes.values())))})


def _authenticate(req: ShareAsk, rec: ConfigRecord) -> None:
    """Refuse (``FedloraError`` naming the peer and why, before any share is made) relayed keys
    that do not verify against this site's CA: ``key_signing.verify_peers`` with the site's own
    round id, sum and name. Nothing to check for a site without the CA (an old configuration)."""
    ca = str(rec.get("ca", ""))
    if not ca:
        return
    certs = req.certs or (b"",) * len(req.peers)
    sigs = req.sigs or (b"",) * len(req.peers)
    peers = {p: SignedKeys(c, s, sig, cert) for p, c, s, sig, cert in zip(req.peers, req.c_pk, req.s_pk, sigs, certs, strict=True)}
    try:
        key_signing.verify_peers(peers, ca, key_context(str(rec["round_id"]), _sum_of(rec)), str(rec.get("name", "")))
    except KeyAuthError as e:
        raise FedloraError(f"secure aggregation: {e}; refusing to share with it (nothing revealed)") from None


@_protocol
def masked(ctx: Context, content: RecordDict) -> RecordDict:
    """Stage 3: decrypt the neighbours' shares, send the masked vector in the smallest wire type.
    Refused (nothing sent) for a sum this site already sent a masked input for, and when fewer
    than t - 1 neighbours' shares reached it (``SecAggSite.masked_input``). The sum is recorded
    as sent (``SentSums``) before the vector leaves."""
    req = read(MaskedAsk, content, "secagg_masked")
    site, rec = _load(ctx, req.round_id)
    state_dir, sum_of, digest = str(rec.get("state_dir", "")) or None, _sum_of(rec), str(rec.get("digest", "")) or None
    sent = SentSums.load(ctx, state_dir)
    why = sent.problem(req.round_id, sum_of, digest)
    if why:
        raise FedloraError(f"secure aggregation: {why}")
    _unique(req.peers, "share list")
    site.receive_shares({p: b for p, b in zip(req.peers, req.ciphertexts, strict=True)})
    y = site.masked_input(np.frombuffer(rec["vector"], dtype=np.dtype(str(rec["dtype"]))))
    sent.add(req.round_id, sum_of, digest)
    sent.save(ctx, state_dir)
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
