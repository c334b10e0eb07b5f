"""Authenticated SecAgg keys (DESIGN.md section 7, rules 4 and 5): a coordinator that substitutes
the sites' public keys could agree every pairwise secret with a victim and unmask its update.

Each ``test_malicious_...`` plays the coordinator against the sites' real stage handlers
(``fedlora.client.secagg_site.begin`` / ``share`` with a Flower ``Context``) and asserts that the
victim refuses stage 2, naming the peer and the reason, before it makes any share (nothing
revealed). The honest path still sums exactly, in the stage handlers and in an in-process
federation; ``fedlora certs`` issues the certificates the sites sign with.
"""

from __future__ import annotations

import datetime
import json
import logging
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from fedlora.client import secagg_site
from fedlora.client.secagg_site import STATE_KEY, SumOf
from fedlora.client.site import SiteSpec
from fedlora.errors import ConfigError, FedloraError
from fedlora.privacy import key_signing, masking
from fedlora.privacy.key_signing import Credentials, InMemoryCA, KeyAuthError, KeyContext
from fedlora.privacy.secagg import SecAggCoordinator, neighbours
from fedlora.privacy.secagg_vector import EVAL_MODULUS_BITS
from fedlora.protocol import ConsistencyAsk, ConsistencyReply, MaskedAsk, SecAggKeys, SecAggSetup, ShareAsk, ShareReply, UnmaskAsk, UnmaskReply, read, record_of

M = 24  # modulus bits
D = 16  # vector length
FIRST = 1001
SUM = SumOf("finance", 1, "train")


def _ctx(node: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def _content(part) -> RecordDict:
    return RecordDict({"secagg": record_of(part)})


def _raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Signed:
    """n sites with credentials from one CA, all neighbours of each other, driven stage by stage;
    ``keys[u]`` is what u advertised: (c_pk, s_pk, sig, cert)."""

    def __init__(self, n: int = 3, t: int = 2, round_id: str = "finance/1", sum_of: SumOf = SUM,
                 ca: InMemoryCA | None = None) -> None:
        self.ca = ca or InMemoryCA()
        self.nodes = list(range(FIRST, FIRST + n))
        self.names = {u: f"finance-{i + 1}" for i, u in enumerate(self.nodes)}
        self.creds = {u: self.ca.credentials(self.names[u]) for u in self.nodes}
        self.graph = neighbours(self.nodes, n - 1, random.Random(0))
        self.t, self.round_id, self.sum_of = t, round_id, sum_of
        self.ctx = {u: _ctx(u) for u in self.nodes}
        self.coord = SecAggCoordinator(self.graph, t, M, round_id)
        self.vectors = {u: np.random.default_rng(u).integers(0, 2**12, size=D, dtype=np.uint64) for u in self.nodes}
        self.keys: dict[int, tuple[bytes, bytes, bytes, bytes]] = {}

    def begin(self, creds: dict[int, Credentials | None] | None = None, setups: dict[int, SecAggSetup] | None = None) -> None:
        """Stage 1 at every site; with ``setups``, each site is asked its own setup and signs over
        the ``request_digest`` of the message carrying it (as the ClientApp does)."""
        creds = self.creds if creds is None else creds
        for u in self.nodes:
            m = EVAL_MODULUS_BITS if self.sum_of.kind == "evaluate" else M  # what a site accepts for each kind
            setup = SecAggSetup(round_id=self.round_id, threshold=self.t, modulus_bits=m, neighbours=tuple(self.graph[u]))
            setup = setups[u] if setups is not None else setup
            request = secagg_site.request_digest(_content(setup)) if setups is not None else ""
            k = read(SecAggKeys, secagg_site.begin(self.ctx[u], setup, self.vectors[u], sum_of=self.sum_of, credentials=creds[u],
                                                   request=request), "train")
            self.keys[u] = (k.c_pk, k.s_pk, k.sig, k.cert)

    def ask(self, relayed: dict[int, tuple[bytes, bytes, bytes, bytes]], round_id: str | None = None) -> RecordDict:
        """A ShareAsk as ``secure_round`` builds it: keys, certificates and signatures per peer."""
        signed = any(v[2] for v in relayed.values())
        return _content(ShareAsk(round_id=round_id or self.round_id, peers=tuple(relayed), c_pk=tuple(v[0] for v in relayed.values()),
                                 s_pk=tuple(v[1] for v in relayed.values()),
                                 certs=tuple(v[3] for v in relayed.values()) if signed else (),
                                 sigs=tuple(v[2] for v in relayed.values()) if signed else ()))

    def relayed(self, u: int) -> dict[int, tuple[bytes, bytes, bytes, bytes]]:
        return {p: self.keys[p] for p in self.graph[u]}

    def share(self, u: int, relayed: dict[int, tuple[bytes, bytes, bytes, bytes]] | None = None) -> dict[int, bytes]:
        r = read(ShareReply, secagg_site.share(self.ctx[u], self.ask(self.relayed(u) if relayed is None else relayed)), "share")
        return dict(zip(r.peers, r.ciphertexts, strict=True))

    def refused(self, u: int, relayed: dict[int, tuple[bytes, bytes, bytes, bytes]], match: str) -> str:
        """Stage 2 at ``u`` with ``relayed`` is refused (``match`` in the reason) and ``u`` made no share."""
        before = self.ctx[u].state[STATE_KEY]["site"]
        with pytest.raises(FedloraError, match=match) as e:
            self.share(u, relayed)
        assert self.ctx[u].state[STATE_KEY]["site"] == before  # no share made, nothing kept to reveal later
        assert json.loads(str(before))["held"] == {}
        return str(e.value)

    def masked_all(self) -> dict[int, np.ndarray]:
        """Stages 2 and 3, honestly relayed: every site's masked vector."""
        self.coord.relay_keys({u: k[:2] for u, k in self.keys.items()})
        inbox = self.coord.relay_shares({u: self.share(u) for u in self.nodes})
        masked = {}
        for u in self.nodes:
            box = inbox[u]
            reply = secagg_site.masked(self.ctx[u], _content(MaskedAsk(round_id=self.round_id, peers=tuple(box),
                                                                       ciphertexts=tuple(box.values()), wire_dtype="uint32")))
            masked[u] = np.frombuffer(reply["masked"]["y"].data, dtype="<u4").astype(masking.word(M))
        return masked

    def run(self) -> np.ndarray:
        """All stages, honestly relayed (the consistency check included); the unmasked sum."""
        masked = self.masked_all()
        survivors, dropped = self.coord.unmask_request(masked)
        sigs = self.check(survivors, dropped)
        responses = {}
        for u in survivors:
            r = read(UnmaskReply, secagg_site.unmask(self.ctx[u], self.unmask_ask(u, survivors, dropped, sigs)), "unmask")
            responses[u] = {p: (k, (x, y)) for p, k, x, y in zip(r.peers, r.kinds, r.x, r.y, strict=True)}
        return self.coord.aggregate(masked, responses)

    def check(self, survivors: list[int], dropped: list[int], at: list[int] | None = None) -> dict[int, bytes]:
        """The consistency check as ``secure_round`` runs it: each survivor (or each of ``at``) signs the set."""
        ask = _content(ConsistencyAsk(round_id=self.round_id, survivors=tuple(survivors), dropped=tuple(dropped)))
        return {u: read(ConsistencyReply, secagg_site.check(self.ctx[u], ask, credentials=self.creds[u]), "check").sig
                for u in (survivors if at is None else at)}

    def unmask_ask(self, u: int, survivors: list[int], dropped: list[int], sigs: dict[int, bytes]) -> RecordDict:
        group = [p for p in (u, *self.graph[u]) if p in sigs]
        return _content(UnmaskAsk(round_id=self.round_id, survivors=tuple(survivors), dropped=tuple(dropped), signers=tuple(group),
                                  sigs=tuple(sigs[p] for p in group)))

    def plain(self) -> np.ndarray:
        total = np.zeros(D, np.uint64)
        for u in self.nodes:
            total = masking.add(total, self.vectors[u], M)
        return total


VICTIM, PEER, OTHER = FIRST, FIRST + 1, FIRST + 2


# ---- the canonical statement ----------------------------------------------------------
def test_statement_binds_every_field_and_a_signature_verifies_only_over_its_own() -> None:
    ctx, c, s = KeyContext("finance/1", "finance", 1, "train"), b"\x01" * 32, b"\x02" * 32
    base = key_signing.statement(ctx, "finance-1", c, s)
    assert base.startswith(key_signing.DOMAIN)
    variants = [key_signing.statement(KeyContext("finance/2", "finance", 1, "train"), "finance-1", c, s),
                key_signing.statement(KeyContext("finance/1", "medical", 1, "train"), "finance-1", c, s),
                key_signing.statement(KeyContext("finance/1", "finance", 2, "train"), "finance-1", c, s),
                key_signing.statement(KeyContext("finance/1", "finance", 1, "evaluate"), "finance-1", c, s),
                key_signing.statement(ctx, "finance-2", c, s), key_signing.statement(ctx, "finance-1", s, c),
                key_signing.statement(KeyContext("finance/1f", "inance", 1, "train"), "finance-1", c, s)]  # shifted boundary
    assert len({base, *variants}) == len(variants) + 1
    ca = InMemoryCA()
    key, cert = ca.issue("finance-1")
    sig = key_signing.sign_keys(key, ctx, "finance-1", c, s)
    assert key_signing.verify_keys(key_signing.der(cert), sig, ca.cert, ctx, c, s) == "finance-1"
    with pytest.raises(KeyAuthError, match="does not verify"):
        key_signing.verify_keys(key_signing.der(cert), sig, ca.cert, KeyContext("finance/1", "finance", 1, "evaluate"), c, s)


# ---- the honest path -------------------------------------------------------------------
def test_signed_keys_sum_exactly_through_the_stage_handlers() -> None:
    g = Signed(3, 2)
    g.begin()
    for u in g.nodes:  # every site signed, with a certificate naming it
        c_pk, s_pk, sig, cert = g.keys[u]
        assert sig and key_signing.check_certificate(key_signing.load_certificate(cert), g.ca.cert) == g.names[u]
    assert np.array_equal(g.run(), g.plain())


# ---- the attacks -----------------------------------------------------------------------
def test_malicious_coordinator_substituting_a_peers_keys_is_refused() -> None:
    """The man in the middle: the coordinator's own X25519 keys in PEER's slot, PEER's signature
    and certificate kept (it cannot sign for PEER): the victim refuses, naming PEER."""
    g = Signed()
    g.begin()
    c_evil, s_evil = _raw(X25519PrivateKey.generate()), _raw(X25519PrivateKey.generate())
    for swapped in ((c_evil, g.keys[PEER][1]), (g.keys[PEER][0], s_evil), (c_evil, s_evil)):
        relayed = g.relayed(VICTIM) | {PEER: (*swapped, g.keys[PEER][2], g.keys[PEER][3])}
        why = g.refused(VICTIM, relayed, "does not verify")
        assert f"peer {PEER}" in why and g.names[PEER] in why
    assert g.share(VICTIM)  # the honest relay still goes through afterwards


def test_malicious_coordinator_signing_substituted_keys_with_its_own_tls_certificate_is_refused(tmp_path: Path) -> None:
    """The coordinator holds server.key, whose certificate the same CA signed (serverAuth): it is
    not a site certificate."""
    from fedlora.server.certs import make_certs

    out = make_certs(tmp_path / "c", ["finance-2"], ["finance-1"]).out  # a host name that looks like a site name
    ca = InMemoryCA.__new__(InMemoryCA)
    ca.key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
    ca.cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    g = Signed(ca=ca)
    g.begin()
    server_key = serialization.load_pem_private_key((out / "server.key").read_bytes(), None)
    server_cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    c_evil, s_evil = _raw(X25519PrivateKey.generate()), _raw(X25519PrivateKey.generate())
    name = server_cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    sig = key_signing.sign_keys(server_key, KeyContext(g.round_id, "finance", 1, "train"), name, c_evil, s_evil)
    why = g.refused(VICTIM, g.relayed(VICTIM) | {PEER: (c_evil, s_evil, sig, key_signing.der(server_cert))}, "clientAuth")
    assert f"peer {PEER}" in why


def test_malicious_coordinator_relaying_the_victims_own_signed_keys_in_a_peers_slot_is_refused() -> None:
    """A valid key and signature, with the right certificate, but the victim's own name."""
    g = Signed()
    g.begin()
    why = g.refused(VICTIM, g.relayed(VICTIM) | {PEER: g.keys[VICTIM]}, "this site itself")
    assert f"peer {PEER}" in why and g.names[VICTIM] in why


def test_malicious_coordinator_filling_two_slots_with_one_sites_signed_keys_is_refused() -> None:
    """A colluding site signs a second key pair: one certified name for two peers is refused."""
    g = Signed(4, 3)
    g.begin()
    colluder = g.creds[OTHER]
    key, cert = key_signing.check_own(colluder)
    c2, s2 = _raw(X25519PrivateKey.generate()), _raw(X25519PrivateKey.generate())
    sig2 = key_signing.sign_keys(key, KeyContext(g.round_id, "finance", 1, "train"), colluder.name, c2, s2)
    why = g.refused(VICTIM, g.relayed(VICTIM) | {PEER: (c2, s2, sig2, key_signing.der(cert))}, "both carry keys signed by")
    assert colluder.name in why


def test_malicious_certificate_from_another_ca_is_refused() -> None:
    """The coordinator makes a CA of its own and a certificate for PEER's name."""
    g = Signed()
    g.begin()
    rogue = InMemoryCA(common_name="fedlora CA")  # even with the same name as the federation's
    key, cert = rogue.issue(g.names[PEER])
    c_evil, s_evil = _raw(X25519PrivateKey.generate()), _raw(X25519PrivateKey.generate())
    sig = key_signing.sign_keys(key, KeyContext(g.round_id, "finance", 1, "train"), g.names[PEER], c_evil, s_evil)
    why = g.refused(VICTIM, g.relayed(VICTIM) | {PEER: (c_evil, s_evil, sig, key_signing.der(cert))}, "not issued by the federation CA")
    assert f"peer {PEER}" in why


def test_malicious_expired_certificate_is_refused() -> None:
    """A key whose certificate expired (a retired site's, or one leaked since) signs fresh keys."""
    g = Signed()
    g.begin()
    now = datetime.datetime.now(datetime.timezone.utc)
    key, cert = g.ca.issue(g.names[PEER], not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1))
    c_evil, s_evil = _raw(X25519PrivateKey.generate()), _raw(X25519PrivateKey.generate())
    sig = key_signing.sign_keys(key, KeyContext(g.round_id, "finance", 1, "train"), g.names[PEER], c_evil, s_evil)
    why = g.refused(VICTIM, g.relayed(VICTIM) | {PEER: (c_evil, s_evil, sig, key_signing.der(cert))}, "not valid now")
    assert f"peer {PEER}" in why


def test_malicious_unsigned_key_is_refused_when_the_site_has_a_ca() -> None:
    g = Signed()
    g.begin()
    stripped = {p: (c, s, b"", b"") for p, (c, s, _, _) in g.relayed(VICTIM).items()}
    g.refused(VICTIM, stripped, "unsigned")
    one_stripped = g.relayed(VICTIM) | {PEER: (*g.keys[PEER][:2], b"", b"")}
    assert f"peer {PEER}" in g.refused(VICTIM, one_stripped, "unsigned")
    # a peer without signing material of its own is refused as unsigned by a site with the CA
    g2 = Signed()
    g2.begin({u: (Credentials(g2.names[u], ca=g2.ca.pem) if u == PEER else g2.creds[u]) for u in g2.nodes})
    assert not g2.keys[PEER][2]
    assert f"peer {PEER}" in g2.refused(VICTIM, g2.relayed(VICTIM), "unsigned")


def test_malicious_replay_of_signed_keys_from_another_round_or_sum_is_refused() -> None:
    """PEER's genuinely signed keys of round 1 replayed into round 2 (or the train sum's into
    the evaluate sum of the same round): the signature is bound to round id and sum."""
    old = Signed()
    old.begin()
    for round_id, sum_of in (("finance/2", SumOf("finance", 2, "train")), ("finance/1/evaluate", SumOf("finance", 1, "evaluate"))):
        g = Signed(round_id=round_id, sum_of=sum_of, ca=old.ca)
        g.creds = old.creds
        g.begin()
        assert f"peer {PEER}" in g.refused(VICTIM, g.relayed(VICTIM) | {PEER: old.keys[PEER]}, "does not verify")


# ---- one request for every site of a sum ------------------------------------------------
def _train_content(setup: SecAggSetup, *, lr: float = 0.5, adapter: np.ndarray | None = None) -> RecordDict:
    """A train message's content as the coordinator builds it: adapter, config (plan and asks), setup."""
    arrays = ArrayRecord({"lora_B": Array(np.zeros((2, 3), np.float32) if adapter is None else adapter)})
    config = ConfigRecord({"plan.round": 1, "plan.cohort": "finance", "plan.learning_rate": lr, "privacy.dp": True,
                           "privacy.epsilon": 8.0, "model.name": "tiny", "plan.labels": ["a", "b"]})
    return RecordDict({"adapter": arrays, "config": config, "secagg": record_of(setup)})


def test_request_digest_covers_everything_a_site_is_asked_but_its_own_neighbours() -> None:
    setup = SecAggSetup(round_id="finance/1", threshold=3, modulus_bits=24, neighbours=(2, 3, 4), bits=16, clip_range=1.0,
                        weight_scale=1000.0)
    base = secagg_site.request_digest(_train_content(setup))
    assert base == secagg_site.request_digest(_train_content(replace(setup, neighbours=(1, 3, 4))))  # each site its own group
    changed = [_train_content(replace(setup, weight_scale=1e30)), _train_content(replace(setup, threshold=4)),
               _train_content(replace(setup, bits=12)), _train_content(replace(setup, clip_range=2.0)),
               _train_content(replace(setup, modulus_bits=32)), _train_content(replace(setup, round_id="finance/1b")),
               _train_content(setup, lr=0.50000001), _train_content(setup, adapter=np.full((2, 3), 1e-30, np.float32)),
               _train_content(setup, adapter=np.zeros((3, 2), np.float32))]
    digests = [secagg_site.request_digest(c) for c in changed]
    assert base not in digests and len(set(digests)) == len(digests)
    extra = _train_content(setup)
    extra["config"]["privacy.epsilon"] = 80.0
    assert secagg_site.request_digest(extra) != base


def test_malicious_coordinator_asking_each_site_something_else_is_refused_at_stage_two() -> None:
    """The coordinator sends the victim weight scale 100 and every peer 1e30 (so the peers' weight,
    min(1, n / scale), is ~0 and their vectors do not depend on their data: the "sum" minus their
    known vectors is the victim's update), each setup valid on its own. Every honest site signs its
    keys over the request it got; the victim's request differs from its peers', so their
    signatures do not verify for it, nor its for them: stage 2 is refused, no share made."""
    fed = Signed(n=4, t=3)
    scale = {u: 100.0 if u == VICTIM else 1e30 for u in fed.nodes}
    fed.begin(setups={u: SecAggSetup(round_id=fed.round_id, threshold=3, modulus_bits=M, neighbours=tuple(fed.graph[u]), bits=12,
                                     clip_range=1.0, weight_scale=scale[u]) for u in fed.nodes})
    assert "does not verify" in fed.refused(VICTIM, fed.relayed(VICTIM), "does not verify")
    fed.refused(PEER, fed.relayed(PEER), f"peer {VICTIM}.*does not verify")  # and the peers refuse the victim's keys


# ---- the consistency check (Bonawitz et al. 2017, round 3) ----------------------------
def _six() -> Signed:
    """Six sites, all neighbours (k = 5), t = 4 (the sites' floor): every stage up to the masked inputs done."""
    fed = Signed(n=6, t=4)
    fed.begin()
    fed.masked_all()
    return fed


def _unmask_refused(fed: Signed, u: int, ask: RecordDict, match: str) -> None:
    before = json.loads(str(fed.ctx[u].state[STATE_KEY]["site"]))["revealed"]
    with pytest.raises(FedloraError, match=match):
        secagg_site.unmask(fed.ctx[u], ask)
    assert json.loads(str(fed.ctx[u].state[STATE_KEY]["site"]))["revealed"] == before  # no share revealed


def test_malicious_coordinator_showing_split_views_of_who_survived_gets_no_share_of_the_minority_view() -> None:
    """Split view: to get both secrets of the victim the coordinator shows {victim, A, B, C} that the
    victim survived (they reveal its b shares) and {D, E} that it dropped (they would reveal its
    key shares). Each group signs its own view; D sees only 2 signatures over its view, below t = 4,
    and reveals nothing; nor do signatures over the other view count for it."""
    fed = _six()
    v, a, b, c, d, e = fed.nodes
    view1, view2 = ([v, a, b, c, d, e], []), ([a, b, c, d, e], [v])
    sigs1 = fed.check(*view1, at=[v, a, b, c])
    sigs2 = fed.check(*view2, at=[d, e])
    _unmask_refused(fed, d, fed.unmask_ask(d, *view2, sigs2), "only 2 of its group")
    _unmask_refused(fed, d, fed.unmask_ask(d, *view2, sigs1 | sigs2), "only 2 of its group")  # view-1 signatures do not verify
    # the majority view does open, honestly: A reveals the victim's b share, never its key share
    r = read(UnmaskReply, secagg_site.unmask(fed.ctx[a], fed.unmask_ask(a, *view1, sigs1)), "unmask")
    assert dict(zip(r.peers, r.kinds))[v] == "b"


@pytest.mark.parametrize("n, t, colluders", [(3, 2, 0), (6, 4, 1)], ids=["3-sites-t2", "6-sites-t4-one-colluder"])
def test_malicious_coordinator_counting_alive_a_peer_whose_shares_it_withheld_gets_nothing(n: int, t: int, colluders: int) -> None:
    """Bonawitz et al. 2017 require the survivors to be among those who shared (U3 within U2). The
    coordinator withholds from the victim the share ciphertexts of the peers W (it still has t - 1,
    so it masks with the others only), then shows everyone ONE consistent view: W (and a colluder)
    survived, the peers the victim masked with dropped. Had the victim signed and unmasked, its b
    share and its key shares of the dropped would strip every mask from its input. It refuses to
    sign and to unmask (those peers never shared with it), its signature is missing from every
    group, and the shares of its b the coordinator collects stay below t."""
    fed = Signed(n=n, t=t)
    fed.begin()
    fed.coord.relay_keys({u: k[:2] for u, k in fed.keys.items()})
    inbox = fed.coord.relay_shares({u: fed.share(u) for u in fed.nodes})
    victim, others = fed.nodes[0], fed.nodes[1:]
    kept = others[:t - 1]  # the victim masks with these (t - 1 neighbours' shares: enough for stage 3)
    withheld = [u for u in others if u not in kept]
    colluding = kept[:colluders]  # a colluder among the kept, shown alive, reveals everything it holds
    for u in fed.nodes:
        box = {p: inbox[u][p] for p in kept} if u == victim else inbox[u]
        secagg_site.masked(fed.ctx[u], _content(MaskedAsk(round_id=fed.round_id, peers=tuple(box), ciphertexts=tuple(box.values()),
                                                          wire_dtype="uint32")))
    survivors = sorted([victim, *withheld, *colluding])
    dropped = sorted(u for u in kept if u not in colluding)
    with pytest.raises(FedloraError, match="shares never reached this site"):
        fed.check(survivors, dropped, at=[victim])
    sigs = fed.check(survivors, dropped, at=[u for u in survivors if u != victim])
    _unmask_refused(fed, victim, fed.unmask_ask(victim, survivors, dropped, sigs), "without the consistency check")
    b_shares = len(colluding)  # each colluder hands over its share of the victim's b
    for u in (u for u in survivors if u != victim and u not in colluding):
        try:
            r = read(UnmaskReply, secagg_site.unmask(fed.ctx[u], fed.unmask_ask(u, survivors, dropped, sigs)), "unmask")
        except FedloraError:
            continue
        b_shares += sum(1 for p, kind in zip(r.peers, r.kinds) if p == victim and kind == "b")
    assert b_shares < t, f"{b_shares} shares of the victim's b, threshold {t}"


def test_malicious_coordinator_choosing_the_masked_inputs_wire_type_is_refused() -> None:
    """``MaskedAsk.wire_dtype`` is the coordinator's: "object" would send pointers of the site's
    process, a narrow type a lossy form of y. A site sends its masked input only in the type
    its modulus needs."""
    fed = Signed()
    fed.begin()
    fed.coord.relay_keys({u: k[:2] for u, k in fed.keys.items()})
    inbox = fed.coord.relay_shares({u: fed.share(u) for u in fed.nodes})
    box = inbox[VICTIM]
    for wire in ("object", "uint16", "float64", "uint64", "U8"):
        with pytest.raises(FedloraError, match=f"as '{wire}'; its modulus 2\\^{M} travels as uint32 only"):
            secagg_site.masked(fed.ctx[VICTIM], _content(MaskedAsk(round_id=fed.round_id, peers=tuple(box),
                                                                   ciphertexts=tuple(box.values()), wire_dtype=wire)))
    assert "masked_sent" not in fed.ctx[VICTIM].state[STATE_KEY]


def test_malicious_coordinator_asking_a_site_to_sign_a_second_survivor_set_is_refused() -> None:
    fed = _six()
    v, a, *_ = fed.nodes
    fed.check(list(fed.nodes), [], at=[a])
    fed.check(list(fed.nodes), [], at=[a])  # the same set again: the same answer
    with pytest.raises(FedloraError, match="second, different survivor set"):
        fed.check([x for x in fed.nodes if x != v], [v], at=[a])


def test_malicious_coordinator_unmasking_another_set_than_the_signed_one_or_without_the_check_is_refused() -> None:
    fed = _six()
    v, a, b, *_ = fed.nodes
    everyone = (list(fed.nodes), [])
    sigs = fed.check(*everyone)
    other = ([x for x in fed.nodes if x != v], [v])
    _unmask_refused(fed, a, fed.unmask_ask(a, *other, sigs), "differs from the one this site signed")
    fresh = _six()
    _unmask_refused(fresh, fresh.nodes[1], fresh.unmask_ask(fresh.nodes[1], list(fresh.nodes), [], {}), "without the consistency check")


def test_malicious_coordinator_padding_the_signatures_with_repeats_forgeries_or_non_survivors_is_refused() -> None:
    """One real signature repeated, signatures of the wrong signer, garbage bytes: only distinct
    survivors of the site's group with a valid signature count."""
    fed = _six()
    v, a, b, c, d, e = fed.nodes
    view = ([v, a, b, c, e], [d])
    sigs = fed.check(*view, at=[a, b])
    repeated = _content(UnmaskAsk(round_id=fed.round_id, survivors=tuple(view[0]), dropped=tuple(view[1]),
                                  signers=(a, b, b, b), sigs=(sigs[a], sigs[b], sigs[b], sigs[b])))
    _unmask_refused(fed, a, repeated, "only 2 of its group")
    swapped = _content(UnmaskAsk(round_id=fed.round_id, survivors=tuple(view[0]), dropped=tuple(view[1]),
                                 signers=(a, c, v), sigs=(sigs[a], sigs[b], b"\x30" * 70)))
    _unmask_refused(fed, a, swapped, "only 1 of its group")
    # d is named dropped: its valid signature over the same view does not make it count
    sig_d = key_signing.sign_survivors(key_signing.load_signing_key(fed.creds[d].signing_key),
                                       secagg_site.key_context(fed.round_id, fed.sum_of), fed.names[d], *view)
    with_d = _content(UnmaskAsk(round_id=fed.round_id, survivors=tuple(view[0]), dropped=tuple(view[1]),
                                signers=(a, d), sigs=(sigs[a], sig_d)))
    _unmask_refused(fed, a, with_d, "only 1 of its group")


def test_a_site_refuses_to_sign_a_view_that_drops_it_or_names_a_site_twice() -> None:
    fed = _six()
    v, a, *_ = fed.nodes
    with pytest.raises(FedloraError, match="not counted among the survivors"):
        fed.check([x for x in fed.nodes if x != a], [a], at=[a])
    with pytest.raises(FedloraError, match="both survived and dropped"):
        fed.check(list(fed.nodes), [v], at=[a])
    with pytest.raises(FedloraError, match="twice"):
        fed.check([*fed.nodes, v], [], at=[a])


def test_survivor_statement_binds_the_view_context_and_signer() -> None:
    ctx = KeyContext("finance/1", "finance", 1, "train")
    base = key_signing.survivor_statement(ctx, "finance-1", [3, 1, 2], [4])
    assert base == key_signing.survivor_statement(ctx, "finance-1", [1, 2, 3], [4])  # order-free
    for other in (key_signing.survivor_statement(ctx, "finance-1", [1, 2], [3, 4]),
                  key_signing.survivor_statement(ctx, "finance-2", [1, 2, 3], [4]),
                  key_signing.survivor_statement(KeyContext("finance/2", "finance", 2, "train"), "finance-1", [1, 2, 3], [4]),
                  key_signing.survivor_statement(ctx, "finance-1", [1, 2, 3, 4], [])):
        assert other != base
    assert not base.startswith(key_signing.DOMAIN)  # never confusable with a key statement
    # Flower's node ids are unsigned 64-bit (Ray and SuperNodes draw them at random): the largest fit
    big = key_signing.survivor_statement(ctx, "finance-1", [2**64 - 1, 2**63], [2**63 + 1])
    assert big != key_signing.survivor_statement(ctx, "finance-1", [2**64 - 1, 2**63 + 1], [2**63])


def test_a_site_whose_own_certificate_names_another_site_refuses_stage_one() -> None:
    ca = InMemoryCA()
    other = ca.credentials("finance-2")
    ctx = _ctx(FIRST)
    setup = SecAggSetup(round_id="finance/1", threshold=2, modulus_bits=M, neighbours=(FIRST + 1, FIRST + 2))
    with pytest.raises(FedloraError, match="names \\['finance-2'\\], not this site 'finance-1'"):
        secagg_site.begin(ctx, setup, np.zeros(D, np.uint64), sum_of=SUM,
                          credentials=Credentials("finance-1", other.signing_key, other.certificate, ca.pem))
    assert STATE_KEY not in ctx.state  # nothing kept, no keys sent


def test_a_site_without_signing_material_keeps_todays_behaviour_and_warns(caplog) -> None:
    g = Signed()
    secagg_site._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="fedlora.client"):
        g.begin({u: None for u in g.nodes})
    assert "not authenticated" in caplog.text
    assert all(not k[2] and not k[3] for k in g.keys.values())
    assert np.array_equal(g.run(), g.plain())


# ---- the federation, the certs command, the site's configuration --------------------
def test_an_in_process_secure_federation_signs_and_checks_every_key(make_config, tmp_path: Path, monkeypatch) -> None:
    from conftest import run_with

    checked: list[dict[int, str]] = []
    real = key_signing.verify_peers

    def counting(*args, **kw):
        names = real(*args, **kw)
        checked.append(names)
        return names

    monkeypatch.setattr(key_signing, "verify_peers", counting)
    views: list[bool] = []
    real_view = key_signing.survivors_signed

    def counting_views(*args, **kw):
        views.append(real_view(*args, **kw))
        return views[-1]

    monkeypatch.setattr(key_signing, "survivors_signed", counting_views)
    cfg = make_config(tmp_path / "run", cohorts={"finance": {"sites": 3}}, train__rounds=1,
                      secure_aggregation={"enabled": True, "bits": 20, "clip_range": 1.0})
    run = run_with(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["cohorts"]["finance"]["secure_aggregation"] is True
    lines = [json.loads(x)["cohorts"]["finance"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [x for x in lines if "sites_trained" in x]
    assert trained and all(x["sites_trained"] == 3 and x["sites_failed"] == [] for x in trained)
    assert not any("secure_aggregation_aborted" in x or "secure_aggregation_eval_aborted" in x for x in lines)
    assert len(checked) >= 3  # every site checked its peers' signatures in stage 2
    assert all(sorted(names.values()) == sorted(set(names.values())) and len(names) == 2 for names in checked)
    assert {n for names in checked for n in names.values()} == {"finance-1", "finance-2", "finance-3"}
    # the consistency check ran before every unmasking: each site verified its peers' survivor signatures (t = 2 of 3:
    # itself and one valid peer signature suffice), all of them valid
    assert len(views) >= 3 and all(views)
    assert summary["sites"] == 3 and json.loads((run / "sites.json").read_text())["finance"] == ["finance-1", "finance-2", "finance-3"]


def test_certs_writes_site_certificates_chaining_to_the_ca_and_never_overwrites(tmp_path: Path) -> None:
    from fedlora.server.certs import make_certs

    d = make_certs(tmp_path / "c", ["coordinator.example.org"], ["bank-a", "clinic-b"]).out
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    for name in ("bank-a", "clinic-b"):
        cert = key_signing.load_certificate((d / f"{name}.crt").read_bytes())
        assert key_signing.check_certificate(cert, ca) == name
        key = serialization.load_ssh_private_key((d / f"{name}.key").read_bytes(), None)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # the SuperNode key, certified
        key_signing.check_own(Credentials(name, (d / f"{name}.key").read_text(), (d / f"{name}.crt").read_text(), (d / "ca.pem").read_text()))
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    r = make_certs(d, ["coordinator.example.org"], ["bank-a", "shop-c"])
    assert r.created == ["shop-c.key", "shop-c.pub", "shop-c.crt"] and "bank-a.crt" in r.kept
    assert all((d / n).read_bytes() == b for n, b in before.items() if n != "WHERE-FILES-GO.txt")
    assert "bank-a.crt" in r.guide
    # a folder made before certificates: the missing .crt is issued for the key already there
    (d / "clinic-b.crt").unlink()
    r = make_certs(d, ["coordinator.example.org"], [])
    assert r.created == ["clinic-b.crt"] and (d / "clinic-b.key").read_bytes() == before["clinic-b.key"]
    cert = key_signing.load_certificate((d / "clinic-b.crt").read_bytes())
    assert key_signing.check_certificate(cert, ca) == "clinic-b"
    assert cert.public_key().public_numbers() == \
        serialization.load_ssh_private_key(before["clinic-b.key"], None).public_key().public_numbers()


def test_a_deployed_site_reads_its_signing_material_from_the_node_config(tmp_path: Path) -> None:
    from fedlora.client.agent import SiteOptions, check_site_cert, default_cert, node_config
    from fedlora.server.certs import make_certs

    d = make_certs(tmp_path / "c", ["h"], ["finance-1"]).out
    key, crt, ca = d / "finance-1.key", d / "finance-1.crt", d / "ca.pem"
    assert default_cert(key, None) == crt and default_cert(key, tmp_path / "x.crt") == tmp_path / "x.crt"
    opts = SiteOptions(server="127.0.0.1:9092", data=tmp_path / "d.csv", domain="finance", name="finance-1", key=key, root_cert=ca,
                       cert=crt, state_dir=tmp_path / "state")
    check_site_cert(opts)
    conf = dict(x.split("=", 1) for x in node_config(opts).split(" "))
    conf = {k: v.strip('"') for k, v in conf.items()}
    assert (conf["signing-key"], conf["cert"], conf["ca"]) == (str(key.resolve()), str(crt.resolve()), str(ca.resolve()))
    spec = SiteSpec.from_node_config(conf)
    creds = spec.credentials
    assert creds is not None and creds.signs and creds.verifies and creds.name == "finance-1"
    assert "PRIVATE KEY" not in repr(spec)  # the private key is not in the repr
    with pytest.raises(ConfigError, match="not this site 'bank-z'"):
        check_site_cert(SiteOptions(**{**opts.__dict__, "name": "bank-z"}))
    # a certs folder made before this change: no .crt, no signing keys in the node config
    crt.unlink()
    assert default_cert(key, None) is None
    old = node_config(SiteOptions(**{**opts.__dict__, "cert": None}))
    assert "signing-key" not in old and "cert=" not in old
    with pytest.raises(ConfigError, match="give both or neither"):
        SiteSpec.from_node_config({**conf, "cert": ""})
