"""A site's side of secure aggregation: the SecAgg+ stages as ClientApp handlers.

Stage 1 runs inside ``train`` (after local training) or ``evaluate``: the site turns its
update (``train_vector``) or its metrics (``eval_vector``) into the integers it will mask
(``fedlora.privacy.secagg_vector``), keeps them and its protocol secrets in its node state
(record ``fedlora.secagg``; nothing secret leaves the site), and replies with its two public
keys instead of the update or the metrics. ``<kind>.secagg_share``, ``<kind>.secagg_masked``,
``<kind>.secagg_check`` and ``<kind>.secagg_unmask`` carry stages 2-4 and the consistency check.

Against an active coordinator every refusal below is a ``FedloraError`` naming the problem,
raised before anything is revealed (no keys, no shares, no masked vector):

* before any work (``check_setup``, from the ClientApp's ``before_work``) and at stage 1: the
  group and threshold (``fedlora.privacy.secagg.check_parameters``), the quantiser and weight
  scale of a train sum, the modulus of an evaluate sum (2^64 only);
* stage 1: this site's own signing material, when it has some, that its peers would refuse
  (``fedlora.privacy.key_signing.check_own``);
* stage 2: the relayed keys (``SecAggSite.check_relayed``), a peer named twice; and, when the
  site has the federation CA (``Credentials.ca``), any peer key that is unsigned, badly
  signed, signed for another round or sum, under a certificate not issued by the CA (or
  expired, or not a site's), or whose certified name repeats another peer's or is this site's
  own (``key_signing.verify_peers``);
* stage 3: fewer than t - 1 neighbours' shares (``SecAggSite.masked_input``);
* the consistency check (``<kind>.secagg_check``, Bonawitz et al. 2017 round 3, when keys are
  signed): the site signs the survivor set it is shown, once per sum; a second, different set
  is refused (``check``). Stage 4, at a site with the CA: the set to unmask must be the one it
  signed, with valid signatures over it from at least t of its group (itself and neighbours
  whose certificates it checked at stage 2), else it reveals no share (``_check_view``). With a
  complete graph (k = n - 1, the default up to 8 sites) two views each need t of the same n
  signers, and an honest site signs one, so no split view gets past 2 t > n + colluders;
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
its two public keys, bound to the round id, its sum (cohort, round, kind), what it was asked
(``request_digest``: peers asked something else do not verify) and its name, and
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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from fedlora.errors import FedloraError
from fedlora.files import write_text_atomic
from fedlora.privacy import key_signing, masking
from fedlora.privacy.key_signing import Credentials, KeyAuthError, KeyContext, SignedKeys
from fedlora.privacy.quantization import Quantizer, wire_dtype
from fedlora.privacy.secagg import SecAggAbort, SecAggSite, UnmaskRefused, check_parameters, site_from_json, site_to_json
from fedlora.privacy.secagg_vector import EVAL_LOSS_SCALE, EVAL_MODULUS_BITS, eval_vector, site_vector, site_weight
from fedlora.protocol import (AdapterRef, ConsistencyAsk, ConsistencyReply, MaskedAsk, SecAggKeys, SecAggSetup, ShareAsk, ShareReply, UnmaskAsk,
                              UnmaskReply, read, record_of)

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
    h = hashlib.sha256(v.dtype.str.encode() + b"\0")
    h.update(memoryview(v).cast("B"))  # no copy of the vector
    return h.hexdigest()


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


def refuse_replay_early(ctx: Context, setup: SecAggSetup, sum_of: SumOf, state_dir: str | Path | None) -> None:
    """Before any training or DP charge: refuse (``FedloraError`` naming it) a setup this site
    will not take part in (``check_setup``) and a sum it already sent a masked input for, by
    round id or by ``sum_of`` (its own cohort, the plan's round, the handler's kind), so a bad
    or re-asked round costs neither budget nor compute. The vector's digest is checked in
    ``begin``, once there is a vector."""
    check_setup(int(ctx.node_id), setup, sum_of.kind)
    _refuse_replay(ctx, state_dir, setup.round_id, sum_of, None)


def _unique(peers: Sequence[int], what: str) -> None:
    repeated = sorted({p for p in peers if list(peers).count(p) > 1})
    if repeated:
        raise FedloraError(f"secure aggregation: the {what} names peers {repeated} more than once")


def quantizer(setup: SecAggSetup) -> Quantizer:
    if setup.clip_range is None or setup.bits is None:
        raise FedloraError("secure aggregation: the train setup lacks the quantiser (clip_range, bits)")
    try:
        return Quantizer(float(setup.clip_range), int(setup.bits), int(setup.modulus_bits))
    except ValueError as e:
        raise FedloraError(f"secure aggregation: the train setup's quantiser is unusable: {e}") from None


def check_setup(node: int, setup: SecAggSetup, kind: str) -> None:
    """Refuse (``FedloraError`` naming it) a setup this site will not take part in, before any data
    is read, anything trained or any budget charged, and before any key: the group and threshold
    (``check_parameters``); for ``evaluate`` a modulus other than ``EVAL_MODULUS_BITS`` (the one
    the coordinator always uses there: a chosen smaller one would turn the range refusal of
    ``begin`` into an oracle on this site's metrics); for ``train`` the quantiser and a positive,
    finite weight scale. ``kind`` "" (the pure protocol) checks the group and threshold only."""
    try:
        check_parameters(node, list(setup.neighbours), int(setup.threshold))
    except SecAggAbort as e:
        raise FedloraError(f"secure aggregation: {e}") from None
    if kind == "evaluate" and int(setup.modulus_bits) != EVAL_MODULUS_BITS:
        raise FedloraError(f"secure aggregation: an evaluate sum modulo 2^{setup.modulus_bits}; this site sums its metrics "
                           f"modulo 2^{EVAL_MODULUS_BITS} only (another modulus would make its answer depend on its metrics)")
    if kind == "train":
        quantizer(setup)
        scale = setup.weight_scale
        if scale is None or not math.isfinite(float(scale)) or float(scale) <= 0:
            raise FedloraError(f"secure aggregation: the train setup's weight_scale {scale!r} is not a positive finite number")


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


def key_context(round_id: str, sum_of: SumOf | None, request: str = "") -> KeyContext:
    """What this site's signature is bound to, and what it checks its peers' against."""
    if sum_of is None:
        return KeyContext(round_id, request=request)
    return KeyContext(round_id, sum_of.cohort, int(sum_of.round), sum_of.kind, request)


def _canonical(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float):
        return {"float": value.hex()}  # exact, and 1.0 is not 1
    return value


def request_digest(content: RecordDict) -> str:
    """SHA-256 (hex) of what a ``train`` / ``evaluate`` message asks of this site, except its own
    neighbour list: every record but ``secagg`` (round plan, privacy asks, model spec as config
    keys and values; the adapter as names, dtypes, shapes and bytes) and the ``secagg`` setup's
    other keys (round id, threshold, modulus, quantiser, weight scale). Every site of one honest
    secure sum is asked the same, so their digests agree; each site signs its keys over its own
    (``key_signing.KeyContext.request``) and checks its peers' signatures against its own, so a
    coordinator that asks different sites different things (a per-site weight scale, quantiser,
    learning rate, privacy ask or adapter) gets its sum refused at stage 2, before any share.
    A message that names its adapter by digest (``AdapterRef``) is covered through that digest
    and not the adapter's bytes (which the coordinator leaves out for a site that holds them):
    the site uses only an adapter whose bytes hash to it (``adapter_cache.adapter_for``)."""
    h = hashlib.sha256(b"fedlora-secagg-request/v1\0")
    by_ref = AdapterRef.record in content
    for name in sorted(content.keys()):
        if by_ref and name == "adapter":
            continue
        record = content[name]
        h.update(json.dumps(["record", name, type(record).__name__]).encode() + b"\0")
        if isinstance(record, ArrayRecord):
            for key in sorted(record.keys()):
                arr = record[key]
                h.update(json.dumps([key, arr.dtype, list(arr.shape), arr.stype, len(arr.data)]).encode() + b"\0")
                h.update(arr.data)
        else:
            items = {k: v for k, v in dict(record).items() if not (name == SecAggSetup.record and k == "neighbours")}
            h.update(json.dumps({k: _canonical(v) for k, v in items.items()}, sort_keys=True).encode() + b"\0")
    return h.hexdigest()


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
          state_dir: str | Path | None = None, credentials: Credentials | None = None, request: str = "") -> RecordDict:
    """Stage 1: keep the masked-to-be vector and fresh secrets; reply with the public keys.
    ``setup`` is the message's record ``secagg``: round id, this site's neighbours, threshold,
    modulus bits. ``sum_of`` (what the site knows the sum is for) and ``state_dir`` (where the
    site keeps its state across runs) arm the replay checks beyond the round id.
    ``credentials``: the site's signing material; with a key and certificate the keys go out
    signed, with the CA stage 2 will require its peers' keys signed (module docstring).
    ``request``: ``request_digest`` of the message; the keys are signed over it and the peers'
    keys must be signed over the same (an empty one in the pure protocol tests).

    Refuses (``FedloraError``, nothing revealed) a group or threshold below the site's floor
    (``check_parameters``), a second sum this site already sent a masked input for (same
    round id, same ``sum_of``, or, except for ``evaluate``, the same vector), and signing
    material of its own that does not fit together (``key_signing.check_own``)."""
    node = int(ctx.node_id)
    peers = list(setup.neighbours)
    check_setup(node, setup, "evaluate" if sum_of is not None and sum_of.kind == "evaluate" else "")  # train's: before_work
    vector = np.asarray(vector)
    if vector.dtype.kind != "u":
        raise FedloraError(f"secure aggregation: the vector to mask must hold unsigned integers, got {vector.dtype}")
    word = masking.word(int(setup.modulus_bits))
    if vector.dtype.itemsize > word.itemsize:  # kept, hashed and masked in the modulus's machine word (uint32 for m <= 32)
        if vector.size and int(vector.max()) >> int(setup.modulus_bits):
            raise FedloraError(f"secure aggregation: the vector to mask has an entry at or above 2^{setup.modulus_bits}")
        vector = vector.astype(word)
    digest = None if sum_of is not None and sum_of.kind == "evaluate" else vector_digest(vector)
    _refuse_replay(ctx, state_dir, setup.round_id, sum_of, digest)
    site = SecAggSite(node, peers, setup.threshold, setup.modulus_bits, setup.round_id)
    c_pk, s_pk = site.advertise()
    keys = _signed_keys(credentials, key_context(setup.round_id, sum_of, request), c_pk, s_pk)
    ctx.state[STATE_KEY] = ConfigRecord({"site": site_to_json(site), "vector": vector.tobytes(), "dtype": vector.dtype.str,
                                         "round_id": setup.round_id, "sum_of": "" if sum_of is None else sum_of.key(),
                                         "request": request,
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


def _save(ctx: Context, site: SecAggSite, rec: ConfigRecord, **more: str) -> None:
    ctx.state[STATE_KEY] = ConfigRecord({**dict(rec), "site": site_to_json(site), **more})


def _sum_of(rec: ConfigRecord) -> SumOf | None:
    text = str(rec.get("sum_of", ""))
    return SumOf(*json.loads(text)) if text else None


def _context(rec: ConfigRecord) -> KeyContext:
    """The key context of the sum this site's state holds (its round id, sum and request)."""
    return key_context(str(rec["round_id"]), _sum_of(rec), str(rec.get("request", "")))


def _protocol(fn):
    @functools.wraps(fn)
    def run(ctx: Context, content: RecordDict, **kw: Any) -> RecordDict:
        try:
            return fn(ctx, content, **kw)
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
    peer_certs = _authenticate(req, rec)
    keys = {p: (c, s) for p, c, s in zip(req.peers, req.c_pk, req.s_pk, strict=True)}
    boxes = site.share_keys(keys)
    _save(ctx, site, rec, peer_certs=json.dumps(peer_certs))
    return RecordDict({ShareReply.record: record_of(ShareReply(peers=tuple(boxes), ciphertexts=tuple(boxes.values())))})


def _authenticate(req: ShareAsk, rec: ConfigRecord) -> dict[str, list[str]]:
    """Refuse (``FedloraError`` naming the peer and why, before any share is made) relayed keys
    that do not verify against this site's CA: ``key_signing.verify_peers`` with the site's own
    round id, sum and name. Returns peer node id -> (certified name, certificate DER as hex),
    which the consistency check verifies the peers' survivor signatures with. Nothing to check
    (and {} returned) for a site without the CA (an old configuration)."""
    ca = str(rec.get("ca", ""))
    if not ca:
        return {}
    certs = req.certs or (b"",) * len(req.peers)
    sigs = req.sigs or (b"",) * len(req.peers)
    peers = {p: SignedKeys(c, s, sig, cert) for p, c, s, sig, cert in zip(req.peers, req.c_pk, req.s_pk, sigs, certs, strict=True)}
    try:
        names = key_signing.verify_peers(peers, ca, _context(rec), str(rec.get("name", "")))
    except KeyAuthError as e:
        raise FedloraError(f"secure aggregation: {e}; refusing to share with it (nothing revealed)") from None
    return {str(p): [names[p], peers[p].cert.hex()] for p in names}


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
    expected = wire_dtype(int(site.modulus_bits))
    if str(req.wire_dtype) != expected.name:  # any other would send a lossy (or, for "object", a pointer) form of y
        raise FedloraError(f"secure aggregation: asked to send the masked input as {req.wire_dtype!r}; its modulus 2^"
                           f"{site.modulus_bits} travels as {expected.name} only")
    site.receive_shares({p: b for p, b in zip(req.peers, req.ciphertexts, strict=True)})
    y = site.masked_input(np.frombuffer(rec["vector"], dtype=np.dtype(str(rec["dtype"]))))
    sent.add(req.round_id, sum_of, digest)
    sent.save(ctx, state_dir)
    _save(ctx, site, rec, masked_sent="1")
    wire = expected.newbyteorder("<")
    arr = Array(dtype=wire.name, shape=(len(y),), stype=MASKED_STYPE, data=y.astype(wire, copy=False).tobytes())
    return RecordDict({"masked": ArrayRecord({"y": arr})})


def view_digest(survivors: Sequence[int], dropped: Sequence[int]) -> str:
    """SHA-256 of one view of who survived (sorted survivors, sorted dropped)."""
    return hashlib.sha256(json.dumps([sorted(int(x) for x in survivors), sorted(int(x) for x in dropped)]).encode()).hexdigest()


def _view_problem(node: int, survivors: Sequence[int], dropped: Sequence[int]) -> str:
    if len(set(survivors)) != len(survivors) or len(set(dropped)) != len(dropped):
        return "the survivor or dropped list names a site twice"
    if set(survivors) & set(dropped):
        return f"sites {sorted(set(survivors) & set(dropped))[:8]} are named both survived and dropped"
    if node not in survivors:
        return "this site sent its masked input but is not counted among the survivors (its key share would unmask it)"
    return ""


@_protocol
def check(ctx: Context, content: RecordDict, *, credentials: Credentials | None = None) -> RecordDict:
    """The consistency check (Bonawitz et al. 2017, round 3), between stage 3 and stage 4: the
    coordinator shows the survivor set it will unmask; this site signs it, once per sum
    (``key_signing.sign_survivors``, bound to the round id, its sum and its name). Refused (no
    signature) when the set is malformed, does not count this site although it sent its masked
    input, or differs from a set it already signed for this sum (a split view). A site that
    cannot sign replies with an empty signature (its peers with the CA will then not count it)."""
    req = read(ConsistencyAsk, content, "secagg_check")
    site, rec = _load(ctx, req.round_id)
    node = int(ctx.node_id)
    if not str(rec.get("masked_sent", "")):
        raise FedloraError("secure aggregation: asked to sign a survivor set before this site sent its masked input")
    problem = _view_problem(node, req.survivors, req.dropped)
    unshared = site.unshared_survivors(req.survivors)
    if not problem and unshared:
        problem = (f"survivors {unshared[:8]} are neighbours whose shares never reached this site (it did not mask with them; "
                   "Bonawitz et al. 2017: survivors must be among those who shared)")
    if problem:
        raise FedloraError(f"secure aggregation: consistency check refused: {problem}")
    digest = view_digest(req.survivors, req.dropped)
    signed = str(rec.get("view", ""))
    if signed and signed != digest:
        raise FedloraError("secure aggregation: asked to sign a second, different survivor set for the same sum (a split view "
                           "of who survived); refused, nothing more revealed")
    sig = b""
    if credentials is not None and credentials.signs:
        try:
            key, _ = key_signing.check_own(credentials)
        except KeyAuthError as e:
            raise FedloraError(f"secure aggregation: {e}") from None
        sig = key_signing.sign_survivors(key, _context(rec), credentials.name, req.survivors, req.dropped)
    ctx.state[STATE_KEY] = ConfigRecord({**dict(rec), "view": digest})
    return RecordDict({ConsistencyReply.record: record_of(ConsistencyReply(sig=sig))})


def _check_view(site: SecAggSite, req: UnmaskAsk, rec: ConfigRecord) -> None:
    """Before stage 4, at a site with the CA: the set to unmask is the one it signed, and at least
    t of its group (itself and the neighbours whose certificates it checked at stage 2) signed that
    same set (``UnmaskRefused`` otherwise, naming how many did); only neighbours that shared
    with it at stage 2 count (``SecAggSite.shared_peers``)."""
    if not str(rec.get("ca", "")):
        return
    node, threshold, shared = site.node, int(site.threshold), site.shared_peers()
    signed = str(rec.get("view", ""))
    if not signed:
        raise UnmaskRefused(f"site {node}: asked to unmask without the consistency check (this site signed no survivor set)")
    if view_digest(req.survivors, req.dropped) != signed:
        raise UnmaskRefused(f"site {node}: the survivor set to unmask differs from the one this site signed (a split view)")
    certs = json.loads(str(rec.get("peer_certs", "") or "{}"))
    context, alive = _context(rec), set(req.survivors)
    confirmed = {node}
    for signer, sig in zip(req.signers, req.sigs, strict=True):
        if len(confirmed) >= threshold:
            break
        entry = certs.get(str(signer))
        if signer in confirmed or signer not in alive or signer not in shared or entry is None:
            continue
        if key_signing.survivors_signed(bytes.fromhex(entry[1]), sig, context, entry[0], req.survivors, req.dropped):
            confirmed.add(signer)
    if len(confirmed) < threshold:
        raise UnmaskRefused(f"site {node}: only {len(confirmed)} of its group (itself included) signed this survivor set, below "
                            f"the threshold {threshold}; refusing to unmask")


@_protocol
def unmask(ctx: Context, content: RecordDict) -> RecordDict:
    """Stage 4: the b share of each surviving neighbour, the key share of each dropped one. A site
    with the CA first checks the consistency round's signatures (``_check_view``)."""
    req = read(UnmaskAsk, content, "secagg_unmask")
    site, rec = _load(ctx, req.round_id)
    _check_view(site, req, rec)
    shares = site.unmask(list(req.survivors), list(req.dropped))
    _save(ctx, site, rec)
    peers = tuple(shares)
    return RecordDict({UnmaskReply.record: record_of(UnmaskReply(peers=peers, kinds=tuple(shares[p][0] for p in peers),
                                                                 x=tuple(shares[p][1][0] for p in peers),
                                                                 y=tuple(shares[p][1][1] for p in peers)))})
