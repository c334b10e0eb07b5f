"""SecAgg+ against an active coordinator (DESIGN.md section 7): the site-side checks.

Each test plays the coordinator against the sites' real stage handlers
(``fedlora.client.secagg_site.begin / share / masked / unmask`` with a Flower ``Context``, or
``SecAggSite`` where the glue adds nothing) and asserts that the attack is refused before
anything is revealed: no keys, no shares, no masked vector, and no record of a sum sent.
The attacks are the review's: (1) withhold the stage-3 shares, (2) a low threshold with split
views of the survivors, (3) reflected or repeated keys, (4) the same round asked twice, (5) a
group too small. The honest path still sums exactly with dropouts down to t.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedlora.client import secagg_site
from fedlora.client.secagg_site import SENT_FILE, SENT_KEY, STATE_KEY, SumOf
from fedlora.config import SecureAggregationConfig
from fedlora.errors import SITE_ERROR_CODE, FedloraError
from fedlora.privacy import key_signing, masking
from fedlora.privacy.key_signing import InMemoryCA, KeyContext
from fedlora.privacy.secagg import (SecAggAbort, SecAggCoordinator, SecAggSite, check_parameters, neighbours, site_from_json,
                                    colluders_tolerated, threshold_floor)
from fedlora.privacy.secagg_vector import EVAL_MODULUS_BITS
from fedlora.protocol import MaskedAsk, SecAggKeys, SecAggSetup, ShareAsk, ShareReply, UnmaskAsk, UnmaskReply, read, record_of
from fedlora.server.secure_round import plan
from test_privacy_review_attacks import Harness, _call, _ok, h  # noqa: F401 - h is the fixture the app-level test uses
from test_secagg_protocol import M, _run

D = 40  # vector length
FIRST = 1001  # node ids as LocalGrid gives them


# ---- a coordinator driving the real glue -----------------------------------------------
def _ctx(node: int, run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=node, node_config={}, state=RecordDict(), run_config={})


def _content(part) -> RecordDict:
    return RecordDict({"secagg": record_of(part)})


def _vectors(nodes: list[int], seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 2**16, size=D, dtype=np.uint64) for u in nodes}


class Group:
    """n sites (one Context each) on a k-regular graph, threshold t, driven stage by stage."""

    def __init__(self, n: int, k: int, t: int, round_id: str = "finance/1", *, seed: int = 0,
                 sum_of: SumOf | None = SumOf("finance", 1, "train"), state_dirs: dict[int, Path] | None = None) -> None:
        self.m = EVAL_MODULUS_BITS if sum_of is not None and sum_of.kind == "evaluate" else M  # what a site accepts
        self.nodes = list(range(FIRST, FIRST + n))
        self.graph = neighbours(self.nodes, k, random.Random(seed))
        self.t, self.round_id, self.sum_of, self.state_dirs = t, round_id, sum_of, state_dirs or {}
        self.ctx = {u: _ctx(u) for u in self.nodes}
        self.coord = SecAggCoordinator(self.graph, t, self.m, round_id)
        self.inbox: dict[int, dict[int, bytes]] = {}

    def setup(self, u: int, *, threshold: int | None = None, peers: tuple[int, ...] | None = None,
              round_id: str | None = None) -> SecAggSetup:
        return SecAggSetup(round_id=round_id or self.round_id, threshold=self.t if threshold is None else threshold,
                           modulus_bits=self.m, neighbours=tuple(self.graph[u]) if peers is None else peers)

    def begin(self, vectors: dict[int, np.ndarray]) -> dict[int, tuple[bytes, bytes]]:
        keys = {}
        for u in self.nodes:
            reply = secagg_site.begin(self.ctx[u], self.setup(u), vectors[u], sum_of=self.sum_of,
                                      state_dir=self.state_dirs.get(u))
            k = read(SecAggKeys, reply, "train")
            keys[u] = (k.c_pk, k.s_pk)
        return keys

    def share_ask(self, u: int, relayed: dict[int, tuple[bytes, bytes]]) -> RecordDict:
        return _content(ShareAsk(round_id=self.round_id, peers=tuple(relayed), c_pk=tuple(c for c, _ in relayed.values()),
                                 s_pk=tuple(s for _, s in relayed.values())))

    def share(self, keys: dict[int, tuple[bytes, bytes]]) -> None:
        relayed = self.coord.relay_keys(keys)
        sent = {}
        for u, ks in relayed.items():
            r = read(ShareReply, secagg_site.share(self.ctx[u], self.share_ask(u, ks)), "share")
            sent[u] = dict(zip(r.peers, r.ciphertexts, strict=True))
        self.inbox = self.coord.relay_shares(sent)

    def masked(self, u: int, box: dict[int, bytes] | None = None) -> np.ndarray:
        box = self.inbox[u] if box is None else box
        wire = "uint32" if self.m <= 32 else "uint64"
        reply = secagg_site.masked(self.ctx[u], _content(MaskedAsk(round_id=self.round_id, peers=tuple(box),
                                                                   ciphertexts=tuple(box.values()), wire_dtype=wire)))
        return np.frombuffer(reply["masked"]["y"].data, dtype=np.dtype(wire).newbyteorder("<")).astype(masking.word(self.m))

    def unmask(self, masked: dict[int, np.ndarray]) -> np.ndarray:
        survivors, dropped = self.coord.unmask_request(masked)
        responses = {}
        ask = _content(UnmaskAsk(round_id=self.round_id, survivors=tuple(survivors), dropped=tuple(dropped)))
        for u in survivors:
            r = read(UnmaskReply, secagg_site.unmask(self.ctx[u], ask), "unmask")
            responses[u] = {p: (kind, (x, y)) for p, kind, x, y in zip(r.peers, r.kinds, r.x, r.y, strict=True)}
        return self.coord.aggregate(masked, responses)

    def round(self, vectors: dict[int, np.ndarray], drop_masked: set[int] = frozenset()) -> tuple[np.ndarray, list[int]]:
        self.share(self.begin(vectors))
        masked = {u: self.masked(u) for u in self.nodes if u not in drop_masked}
        return self.unmask(masked), sorted(masked)


def _plain(vectors: dict[int, np.ndarray], nodes: list[int], m: int = M) -> np.ndarray:
    total = np.zeros(D, np.uint64)
    for u in nodes:
        total = masking.add(total, vectors[u], m)
    return total


def _nothing_sent(ctx: Context) -> bool:
    return SENT_KEY not in ctx.state


# ---- 1. withheld shares ------------------------------------------------------------------
def test_malicious_withheld_shares_refuse_the_masked_input() -> None:
    """The coordinator relays the victim fewer than t - 1 of its neighbours' share ciphertexts
    (none at all: its input would carry only its self mask). The victim refuses stage 3 and
    sends nothing; with exactly t - 1 (t survivors of stage 2, itself included) it goes on."""
    g = Group(5, 4, 4)  # everyone a neighbour of everyone, t = ceil(2 * 5 / 3) = 4
    g.share(g.begin(_vectors(g.nodes)))
    victim = g.nodes[0]
    box = g.inbox[victim]
    assert len(box) == 4
    for withheld in ({}, dict(itertools.islice(box.items(), g.t - 2))):
        with pytest.raises(FedloraError, match=f"shares from only {len(withheld)} neighbour.*fewer than the threshold t = 4"):
            g.masked(victim, withheld)
        assert _nothing_sent(g.ctx[victim])
    y = g.masked(victim, dict(itertools.islice(box.items(), g.t - 1)))  # the boundary: t - 1 peers + itself = t
    assert len(y) == D and not _nothing_sent(g.ctx[victim])
    with pytest.raises(FedloraError, match="already sent a masked input for round id 'finance/1'"):
        g.masked(victim, box)  # a second stage 3 of the same sum (another set of masks) is refused too


# ---- 2. low threshold, split views ---------------------------------------------------------
@pytest.mark.parametrize("k, t, message", [
    (4, 2, "threshold t = 2 is below this site's floor 4 for k = 4"),
    (4, 3, "threshold t = 3 is below this site's floor 4 for k = 4"),
    (3, 2, "threshold t = 2 is below this site's floor 3 for k = 3"),
    (7, 5, "threshold t = 5 is below this site's floor 6 for k = 7"),
    (2, 1, "threshold t = 1 is below this site's floor 2 for k = 2"),
    (4, 6, "threshold t = 6 exceeds the k \\+ 1 = 5 shares"),
], ids=["k4-t2", "k4-t3-majority-but-one-colluder", "k3-t2", "k7-t5", "k2-t1", "t-above-k+1"])
def test_malicious_low_threshold_is_refused_before_any_key(k: int, t: int, message: str) -> None:
    g = Group(k + 1, k, t)
    victim = g.nodes[0]
    with pytest.raises(FedloraError, match=message):
        secagg_site.begin(g.ctx[victim], g.setup(victim), _vectors(g.nodes)[victim], sum_of=g.sum_of)
    assert STATE_KEY not in g.ctx[victim].state and _nothing_sent(g.ctx[victim])  # no secrets made, no keys advertised


@pytest.mark.parametrize("k", [2, 3, 4, 6, 7])
def test_malicious_split_views_at_the_floor_never_open_both_secrets_of_a_site(k: int) -> None:
    """Why the floor is ``2 t > k + 1 + c(k)``: with t = threshold_floor(k) and c = 0 .. c(k)
    colluding neighbours (each hands over both of its shares of the victim's secrets), the
    coordinator tells each honest neighbour of the victim either "it survived" (b share) or "it
    dropped" (key share), every split of the honest ones tried, each request itself valid; the
    real ``SecAggSite.unmask`` still leaves it with at most t - 1 shares of one of the two
    secrets every time. At the old floor (a strict majority) one colluder is enough for k = 4."""
    t = threshold_floor(k)
    assert 2 * t > k + 1 + colluders_tolerated(k)
    nodes = list(range(k + 1))
    victim, others = 0, nodes[1:]
    for c in range(colluders_tolerated(k) + 1):
        colluders, honest = others[:c], others[c:]
        for told_survived in itertools.chain.from_iterable(itertools.combinations(honest, r) for r in range(len(honest) + 1)):
            got = _split_view_shares(nodes, t, victim, set(colluders), set(told_survived))
            assert min(got.values()) < t, f"{c} colluder(s), split {told_survived}: {got} shares of site {victim}'s secrets, t {t}"
    if k == 4:  # the strict-majority floor t = 3 with one colluder: both secrets open for some split
        assert any(min(_split_view_shares(nodes, 3, victim, {1}, set(s)).values()) >= 3
                   for s in itertools.chain.from_iterable(itertools.combinations(others[1:], r) for r in range(k)))


def _split_view_shares(nodes: list[int], t: int, victim: int, colluders: set[int], told_survived: set[int]) -> dict[str, int]:
    """Shares of ``victim``'s b and s secrets a coordinator collects with the real stage handlers
    when ``told_survived`` are shown "it survived", the other honest neighbours "it dropped",
    and ``colluders`` hand over both of theirs."""
    others = [u for u in nodes if u != victim]
    sites = {u: SecAggSite(u, [v for v in nodes if v != u], t, M, "r") for u in nodes}
    coord = SecAggCoordinator({u: s.peers for u, s in sites.items()}, t, M, "r")
    keys = coord.relay_keys({u: s.advertise() for u, s in sites.items()})
    for u, boxes in coord.relay_shares({u: s.share_keys(keys[u]) for u, s in sites.items()}).items():
        sites[u].receive_shares(boxes)
    for u in nodes:
        sites[u].masked_input(np.zeros(4, np.uint64))
    got: dict[str, int] = {"b": len(colluders), "sk": len(colluders)}
    for u in (u for u in nodes if u not in colluders):  # the victim itself is always told it survived (else it refuses)
        view = (nodes, []) if u == victim or u in told_survived else (others, [victim])
        try:
            shares = sites[u].unmask(*view)
        except Exception:  # noqa: BLE001 - a refusal hands over nothing
            continue
        if victim in shares:
            got[shares[victim][0]] += 1
    return got


def test_malicious_a_view_counting_alive_a_neighbour_that_never_shared_is_refused_without_a_ca_too() -> None:
    """The pure protocol (a site without the CA, no consistency check): the coordinator withholds
    peer B's shares from the victim (it masks with A only), then asks it to unmask with B alive
    and A dropped: its b share and its key share of A would strip every mask from its input.
    ``SecAggSite.unmask`` refuses (U3 within U2) and reveals nothing."""
    g = Group(3, 2, 2)
    vectors = _vectors(g.nodes)
    g.share(g.begin(vectors))
    victim, a, b = g.nodes
    g.masked(victim, {a: g.inbox[victim][a]})
    before = str(g.ctx[victim].state[STATE_KEY]["site"])
    ask = _content(UnmaskAsk(round_id=g.round_id, survivors=(victim, b), dropped=(a,)))
    with pytest.raises(FedloraError, match=f"survivors \\[{b}\\] are neighbours whose shares never reached this site"):
        secagg_site.unmask(g.ctx[victim], ask)
    assert json.loads(str(g.ctx[victim].state[STATE_KEY]["site"]))["revealed"] == json.loads(before)["revealed"] == {}


# ---- 3. reflected and repeated keys -------------------------------------------------------
def _forge(g: Group, victim: int, keys: dict[int, tuple[bytes, bytes]], how: str) -> dict[int, tuple[bytes, bytes]]:
    peers = sorted(g.graph[victim])
    relayed = {p: keys[p] for p in peers}
    own_c, own_s = keys[victim]
    if how == "own-s-for-every-peer":
        relayed = {p: (c, own_s) for p, (c, _) in relayed.items()}
    elif how == "own-c":
        relayed[peers[0]] = (own_c, relayed[peers[0]][1])
    elif how == "repeated-between-peers":  # one peer above, one below the victim: their masks would cancel
        relayed[peers[-1]] = relayed[peers[0]]
    elif how == "c-equals-s":
        relayed[peers[0]] = (relayed[peers[0]][1], relayed[peers[0]][1])
    elif how == "itself-among-peers":
        relayed[victim] = keys[victim]
    elif how == "not-a-neighbour":
        relayed[9999] = keys[peers[0]][::-1]
    elif how == "small-order-point":
        relayed[peers[0]] = (relayed[peers[0]][0], bytes(32))
    return relayed


@pytest.mark.parametrize("how, message", [
    ("own-s-for-every-peer", "s key relayed for peer .* is this site's own s public key"),
    ("own-c", "c key relayed for peer .* is this site's own c public key"),
    ("repeated-between-peers", "repeats the c key of peer"),
    ("c-equals-s", "s key relayed for peer (\\d+) repeats the c key of peer \\1"),
    ("itself-among-peers", "name this site itself among its peers"),
    ("not-a-neighbour", "keys relayed for \\[9999\\], which are not among its neighbours"),
    ("small-order-point", "not a usable X25519 key"),
])
def test_malicious_reflected_or_repeated_keys_are_refused_at_share(how: str, message: str) -> None:
    g = Group(5, 4, 4)
    keys = g.begin(_vectors(g.nodes))
    victim = g.nodes[2]  # two neighbours below it, two above: reflected keys would cancel its masks exactly
    with pytest.raises(FedloraError, match=message):
        secagg_site.share(g.ctx[victim], g.share_ask(victim, _forge(g, victim, keys, how)))
    held = site_from_json(str(g.ctx[victim].state[STATE_KEY]["site"]))
    assert held._held == {} and held._keys == {}  # no share made, no key taken


def test_malicious_a_peer_named_twice_in_one_stage_is_refused() -> None:
    g = Group(4, 3, 3)
    keys = g.begin(_vectors(g.nodes))
    victim, peer = g.nodes[0], g.graph[g.nodes[0]][0]
    ask = _content(ShareAsk(round_id=g.round_id, peers=(peer, peer), c_pk=(keys[peer][0],) * 2, s_pk=(keys[peer][1],) * 2))
    with pytest.raises(FedloraError, match=f"relayed key list names peers \\[{peer}\\] more than once"):
        secagg_site.share(g.ctx[victim], ask)


# ---- 4. replay and differencing -----------------------------------------------------------
def test_malicious_a_second_sum_for_the_same_round_is_refused_and_train_and_evaluate_are_two_sums(tmp_path: Path) -> None:
    """After a complete sum for (finance, 1, train): the same round id again, the same round
    under a new round id, and the same vector under a new round and round id are all refused
    at stage 1 (no keys), so no second sum over other survivors can difference the victim's
    vector out. The evaluate sum of the same round is another sum and goes through."""
    g = Group(4, 3, 3, state_dirs={u: tmp_path / str(u) for u in range(FIRST, FIRST + 4)})
    vectors = _vectors(g.nodes)
    total, survivors = g.round(vectors)
    assert np.array_equal(total, _plain(vectors, survivors))
    victim = g.nodes[0]
    ctx, state_dir, other = g.ctx[victim], g.state_dirs[victim], _vectors(g.nodes, seed=1)[victim]
    asks = [
        (g.setup(victim), other, SumOf("finance", 1, "train"), "round id 'finance/1'"),
        (g.setup(victim, round_id="finance/1/retry"), other, SumOf("finance", 1, "train"),
         "cohort 'finance' round 1 \\(train\\)"),
        (g.setup(victim, round_id="finance/7"), vectors[victim], SumOf("finance", 7, "train"), "exactly this update"),
        (g.setup(victim, round_id="finance/7"), vectors[victim], None, "exactly this update"),
    ]
    before = str(ctx.state[STATE_KEY]["round_id"])
    for setup, vector, sum_of, message in asks:
        with pytest.raises(FedloraError, match=message):
            secagg_site.begin(ctx, setup, vector, sum_of=sum_of, state_dir=state_dir)
        assert str(ctx.state[STATE_KEY]["round_id"]) == before  # no new secrets, no keys
    ev = Group(4, 3, 3, "finance/1/evaluate", sum_of=SumOf("finance", 1, "evaluate"), state_dirs=g.state_dirs)
    ev.ctx = g.ctx  # the same sites, the same node state
    total, survivors = ev.round(vectors)  # even the same vector: an evaluation's vector is noised or public
    assert np.array_equal(total, _plain(vectors, survivors, EVAL_MODULUS_BITS))


def test_malicious_a_new_run_cannot_replay_the_same_update_into_a_second_sum(tmp_path: Path) -> None:
    """A coordinator that starts a new run (fresh node state) and asks the same round again,
    as after a restart, gets the DP release cache's same update back from training; the site
    remembers it in its state folder and refuses to mask it into a second sum."""
    dirs = {u: tmp_path / str(u) for u in range(FIRST, FIRST + 4)}
    g = Group(4, 3, 3, state_dirs=dirs)
    vectors = _vectors(g.nodes)
    g.round(vectors)
    victim = g.nodes[0]
    assert (dirs[victim] / SENT_FILE).is_file()
    fresh = _ctx(victim, run_id=2)
    with pytest.raises(FedloraError, match="exactly this update"):
        secagg_site.begin(fresh, g.setup(victim), vectors[victim], sum_of=SumOf("finance", 1, "train"), state_dir=dirs[victim])
    assert STATE_KEY not in fresh.state
    # a freshly trained (so different) update for the same round in the new run is a new release: it may be summed
    secagg_site.begin(fresh, g.setup(victim), _vectors(g.nodes, seed=5)[victim], sum_of=SumOf("finance", 1, "train"),
                      state_dir=dirs[victim])


def test_malicious_the_app_refuses_a_re_asked_train_round_under_secure_aggregation(h: Harness) -> None:  # noqa: F811
    """Through the real ClientApp: after the site sent its masked update for round 1, the
    coordinator asks round 1 again (same adapter: the DP release cache replays the update)
    under a new round id, then in a new run: both are refused with a named reason."""
    site = h.site("secagg-replay")
    app, ctx = h.app(site), h.ctx()
    victim, peers = 1001, (1002, 1003, 1004)
    setup = SecAggSetup(round_id="finance/1", threshold=3, modulus_bits=24, neighbours=peers, bits=16, clip_range=1.0,
                        weight_scale=1000.0)
    reply = _call(app, h.msg(secagg=setup), ctx)
    assert _ok(reply), reply
    keys = {victim: (read(SecAggKeys, reply.content, "train").c_pk, read(SecAggKeys, reply.content, "train").s_pk)}
    others = {p: SecAggSite(p, [v for v in (victim, *peers) if v != p], 3, 24, "finance/1") for p in peers}
    keys |= {p: s.advertise() for p, s in others.items()}
    relayed = {p: keys[p] for p in peers}
    shares = read(ShareReply, secagg_site.share(ctx, _content(ShareAsk(round_id="finance/1", peers=peers,
                  c_pk=tuple(c for c, _ in relayed.values()), s_pk=tuple(s for _, s in relayed.values())))), "share")
    sent = {victim: dict(zip(shares.peers, shares.ciphertexts, strict=True))}
    sent |= {p: s.share_keys({v: keys[v] for v in s.peers}) for p, s in others.items()}
    box = {p: sent[p][victim] for p in peers}
    secagg_site.masked(ctx, _content(MaskedAsk(round_id="finance/1", peers=tuple(box), ciphertexts=tuple(box.values()),
                                               wire_dtype="uint32")))
    again = _call(app, h.msg(secagg=replace(setup, round_id="finance/1/again")), ctx)
    assert not _ok(again) and again.error.code == SITE_ERROR_CODE
    assert "already sent a masked input for cohort 'finance' round 1 (train)" in again.error.reason
    new_run = _call(app, h.msg(secagg=setup), h.ctx(run_id=2))
    assert not _ok(new_run) and "exactly this update" in new_run.error.reason


def test_malicious_a_setup_the_site_will_not_take_is_refused_before_data_training_or_budget(h: Harness) -> None:  # noqa: F811
    """Through the real ClientApp: a train setup with an unusable quantiser, a zero or infinite
    weight scale, or a threshold below the floor, and an evaluate setup with a modulus other
    than 2^64, are refused with a named reason before the site reads its data, trains or
    charges its DP budget: nothing is kept in its node state or written to its state folder."""
    good = SecAggSetup(round_id="finance/1", threshold=3, modulus_bits=24, neighbours=(1002, 1003, 1004), bits=16, clip_range=1.0,
                       weight_scale=1000.0)
    cases = [("train", replace(good, clip_range=0.0), "quantiser is unusable: clip_range must be > 0"),
             ("train", replace(good, bits=40), "quantiser is unusable"),
             ("train", replace(good, weight_scale=0.0), "weight_scale 0.0 is not a positive finite number"),
             ("train", replace(good, weight_scale=float("inf")), "weight_scale inf"),
             ("train", replace(good, weight_scale=None), "weight_scale None"),
             ("train", replace(good, threshold=2), "below this site's floor 3"),
             ("evaluate", replace(good, round_id="finance/1/evaluate", modulus_bits=24), "modulo 2\\^64 only")]
    for i, (kind, setup, message) in enumerate(cases):
        site = h.site(f"bad-setup-{i}")
        ctx = h.ctx()
        reply = _call(h.app(site), h.msg(kind, secagg=setup), ctx)
        assert not _ok(reply) and reply.error.code == SITE_ERROR_CODE, (kind, setup, reply)
        assert re.search(message, reply.error.reason), reply.error.reason
        assert len(ctx.state) == 0, list(ctx.state.keys())  # no ledger, no protocol state
        state = Path(site.state_dir)
        assert not state.exists() or not any(state.rglob("*")), list(state.rglob("*"))


def test_malicious_an_evaluate_modulus_is_no_oracle_on_the_metrics() -> None:
    """A coordinator that picks the evaluate sum's modulus could learn the size of a site's
    largest metric from which moduli the range check refuses (binary search on m). Every
    modulus but 2^64 is refused the same way, whatever the metrics; 2^64 takes any."""
    small, large = (secagg_site.metrics_vector(0.1, 0.5, n, [n // 2, n - n // 2]) for n in (10, 10**6))
    for m in range(2, 64):
        for vector in (small, large):
            g = Group(3, 2, 2, f"finance/{m}/evaluate", sum_of=SumOf("finance", m, "evaluate"))
            with pytest.raises(FedloraError, match=f"an evaluate sum modulo 2\\^{m}; this site sums its metrics modulo 2\\^64 only"):
                secagg_site.begin(g.ctx[g.nodes[0]], replace(g.setup(g.nodes[0]), modulus_bits=m), vector, sum_of=g.sum_of)
    g = Group(3, 2, 2, "finance/1/evaluate", sum_of=SumOf("finance", 1, "evaluate"))
    assert np.array_equal(g.round({u: large for u in g.nodes})[0], 3 * large.astype(np.uint64))


def test_malicious_the_app_signs_its_keys_over_the_request_it_got(h: Harness) -> None:  # noqa: F811
    """Through the real ClientApp with a certificate: the keys of a train reply verify over the
    ``request_digest`` of the message the site got, and not over that of a message asking the
    same with another weight scale or another learning rate (what a coordinator sends a peer
    to isolate this site)."""
    ca = InMemoryCA()
    creds = ca.credentials("finance-1")
    site = replace(h.site("signed-request"), signing_key=creds.signing_key, certificate=creds.certificate, ca=creds.ca)
    setup = SecAggSetup(round_id="finance/1", threshold=3, modulus_bits=24, neighbours=(1002, 1003, 1004), bits=16, clip_range=1.0,
                        weight_scale=1000.0)
    msg = h.msg(secagg=setup)
    reply = _call(h.app(site), msg, h.ctx())
    assert _ok(reply), reply
    keys = read(SecAggKeys, reply.content, "train")
    cert = key_signing.load_certificate(ca.pem)

    def verifies(request: str) -> bool:
        context = KeyContext("finance/1", "finance", 1, "train", request)
        try:
            return key_signing.verify_keys(keys.cert, keys.sig, cert, context, keys.c_pk, keys.s_pk) == "finance-1"
        except key_signing.KeyAuthError:
            return False

    assert verifies(secagg_site.request_digest(msg.content))
    assert not verifies(secagg_site.request_digest(h.msg(secagg=replace(setup, weight_scale=1e30)).content))
    assert not verifies(secagg_site.request_digest(h.msg(secagg=setup, plan={"learning_rate": 0.02}).content))
    assert not verifies("")


# ---- 5. group too small -----------------------------------------------------------------------
@pytest.mark.parametrize("peers, threshold, message", [
    ((1002,), 2, "k = 1 neighbour\\(s\\), below the minimum 2"),
    ((), 2, "k = 0 neighbour\\(s\\), below the minimum 2"),
    ((1002, 1002, 1003), 2, "neighbours \\[1002\\] are named more than once"),
    ((1001, 1002, 1003), 3, "named among its own neighbours"),
], ids=["k1", "k0", "repeated-neighbour", "itself"])
def test_malicious_a_group_too_small_is_refused_before_any_key(peers: tuple[int, ...], threshold: int, message: str) -> None:
    ctx = _ctx(1001)
    with pytest.raises(FedloraError, match=message):
        secagg_site.begin(ctx, SecAggSetup(round_id="finance/1", threshold=threshold, modulus_bits=M, neighbours=peers),
                          np.zeros(D, np.uint64))
    assert STATE_KEY not in ctx.state


def test_malicious_floor_lets_the_honest_coordinators_defaults_through() -> None:
    """The coordinator's automatic k and t (``secure_round.plan``) pass every site's floor for
    every cohort size from the smallest secure one (``min_sites`` = 3) up."""
    for n in range(3, 300):
        k, t, _ = plan(SecureAggregationConfig(), n)
        check_parameters(0, list(range(1, k + 1)), t)
        assert t >= threshold_floor(k)
    with pytest.raises(SecAggAbort, match="k = 1 neighbour"):  # a 2-site cohort: each site's only neighbour knows the sum
        check_parameters(0, [1], 2)
    with pytest.raises(ValueError, match="k = 1 neighbour"):  # and the coordinator refuses to plan one (before any round)
        plan(SecureAggregationConfig(min_sites=2), 2)


# ---- the honest path ----------------------------------------------------------------------------
def test_malicious_checks_keep_the_honest_sum_exact_with_dropouts_down_to_t() -> None:
    g = Group(6, 5, 4)  # the coordinator's default for 6 sites: k = 5, t = 4
    vectors = _vectors(g.nodes, seed=3)
    total, survivors = g.round(vectors, drop_masked={g.nodes[0], g.nodes[3]})
    assert survivors == [g.nodes[i] for i in (1, 2, 4, 5)] and len(survivors) == g.t
    assert np.array_equal(total, _plain(vectors, survivors))
    g = Group(9, 4, threshold_floor(4))  # a sparse graph at the floor threshold
    vectors = _vectors(g.nodes, seed=4)
    total, survivors = g.round(vectors, drop_masked={g.nodes[0]})
    assert np.array_equal(total, _plain(vectors, survivors))


def test_malicious_checks_keep_the_pure_protocol_exact_at_the_floor_threshold() -> None:
    t = threshold_floor(7)
    total, inputs, survivors, _ = _run(8, 7, t, 30, {"masked": set(range(8 - t))})
    assert len(survivors) == t
    assert np.array_equal(total, masking.add(np.zeros(30, np.uint64), sum(inputs[u] for u in survivors), M))
    with pytest.raises(SecAggAbort):
        _run(8, 7, t, 30, {"masked": set(range(9 - t))})
