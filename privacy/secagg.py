"""SecAgg+ (Bell et al., CCS 2020; Bonawitz et al., CCS 2017) as pure protocol logic.

No transport here: ``SecAggSite`` and ``SecAggCoordinator`` exchange plain Python values
stage by stage, and the Flower glue carries them in Messages. Stages:

0. setup: the coordinator places the sites on a random k-regular graph (a circulant graph
   over a random permutation) and fixes the threshold t (of k neighbours) and the quantiser;
1. advertise: each site makes two X25519 key pairs, ``c`` (to encrypt shares) and ``s`` (to
   agree pairwise mask seeds), and sends the public keys; the coordinator relays them;
2. share: each site draws a 256-bit self-mask seed ``b_i``, Shamir-splits ``b_i`` and its
   ``s`` private key t-of-(k+1) among its neighbours and itself (it keeps one share, which it
   reveals only for its own self mask), and encrypts each neighbour's pair of shares
   with AES-GCM under ``HKDF-SHA256(X25519(c_i, c_j))`` (associated data binds sender,
   recipient and round); the coordinator relays ciphertexts it cannot read;
3. masked input: site i sends ``y_i = x_i + PRG(b_i) + sum_{j in N(i), j > i} PRG(s_ij)
   - sum_{j in N(i), j < i} PRG(s_ij) (mod 2^m)`` over the neighbours that completed stage 2,
   with ``s_ij = HKDF(X25519(s_i, s_j))`` and PRG = AES-256-CTR (``fedlora.privacy.masking``);
4. unmask: the coordinator names the survivors (sent y) and the dropped (shared keys, sent
   no y); each survivor returns, per neighbour, the ``b`` share of a survivor or the ``s`` key
   share of a dropped one, never both for the same peer (``UnmaskRefused``), and never fewer
   than t survivors. With t shares per secret the coordinator removes every self mask and the
   dropped sites' pairwise masks and obtains ``sum_{i in survivors} x_i (mod 2^m)``.

Below t shares for any needed secret, or fewer than t survivors, the round aborts
(``SecAggAbort``): no sum, and nothing more is revealed.

Against an active coordinator (DESIGN.md section 7) a site also checks what it is sent:

* parameters (``check_parameters``, before stage 1): k >= ``MIN_NEIGHBOURS`` distinct
  neighbours, not itself, and ``threshold_floor(k) <= t <= k + 1``;
* relayed keys (stage 2): only its neighbours', never its own node, never its own public
  keys (a reflected key), no key twice (equal keys above and below it cancel its pairwise
  masks), each a usable X25519 key;
* stage 3 (Bonawitz et al. 2017, round 2: abort when ``|U_2| < t``): it masks only when the
  neighbours whose shares reached it, plus itself, are at least t; otherwise a coordinator
  that withholds the shares gets ``y = x + PRG(b)`` and then ``b`` from the neighbours;
* stage 4 (U3 within U2): it unmasks no view that counts alive a neighbour whose shares never
  reached it (it did not mask with that one), else its b and the key shares of the neighbours
  shown dropped would strip every mask it added.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import masking, shamir


class SecAggAbort(RuntimeError):
    """The round cannot be unmasked (too few survivors or shares); nothing is revealed."""


class UnmaskRefused(RuntimeError):
    """A site refused an unmasking request that would reveal too much."""


MIN_NEIGHBOURS = 2  # k: with one neighbour that neighbour's own input is all the "sum" hides a site behind
MIN_THRESHOLD = 2  # t: one share must never open a secret


def colluders_tolerated(k: int) -> int:
    """c(k) = ceil((k + 1) / 3) - 1: how many colluding sites (they reveal both shares) of a
    group of k + 1 a site's floor threshold is built to tolerate (fewer than a third)."""
    return -(-(k + 1) // 3) - 1


def threshold_floor(k: int) -> int:
    """The least threshold a site accepts in a group of k neighbours and itself: the least t
    with ``2 t > k + 1 + c(k)`` (``colluders_tolerated``), i.e. ``floor((k + 1 + c) / 2) + 1``,
    and at least ``MIN_THRESHOLD``; it equals the coordinator's default ``ceil(2 (k + 1) / 3)``.

    Why: to unmask site v's input the coordinator needs t shares of ``b_v`` and t shares of
    ``s_v``. Each honest holder of the k + 1 reveals at most one of the two per sum (a neighbour
    never both, ``UnmaskRefused``; v never its own ``s`` share); each of c colluders reveals
    both. With split views of who survived the coordinator gets at most ``k + 1 + c`` shares in
    all, so both secrets need ``2 t <= k + 1 + c``: refused when ``2 t > k + 1 + c``. A strict
    majority (``2 t > k + 1``) would let one colluder with split views open a site of a group of
    5 at t = 3 (the consistency check, another layer, stops it in complete graphs only).
    This counts the shares of v's own two secrets. The other route to ``x_v`` (v's b plus the
    keys of the neighbours v masked with, those shown "dropped", while the neighbours whose
    shares were withheld from v are shown "alive") is closed by U3 within U2: v never unmasks a
    view that counts alive a neighbour whose shares did not reach it (``unshared_survivors``)."""
    c = colluders_tolerated(k)
    return max(MIN_THRESHOLD, (k + 1 + c) // 2 + 1)


def check_parameters(node: int, peers: Sequence[int], threshold: int) -> None:
    """Refuse (``SecAggAbort``) a group or threshold a coordinator could use to isolate this
    site: itself or a repeat among its neighbours, fewer than ``MIN_NEIGHBOURS`` neighbours,
    t below ``threshold_floor(k)`` or above the k + 1 shares of each secret."""
    if node in peers:
        raise SecAggAbort(f"site {node}: this site is named among its own neighbours {sorted(peers)}")
    repeated = sorted({p for p in peers if list(peers).count(p) > 1})
    if repeated:
        raise SecAggAbort(f"site {node}: neighbours {repeated} are named more than once")
    k = len(peers)
    if k < MIN_NEIGHBOURS:
        raise SecAggAbort(f"site {node}: k = {k} neighbour(s), below the minimum {MIN_NEIGHBOURS}: so small a group would "
                          "isolate this site")
    if threshold > k + 1:
        raise SecAggAbort(f"site {node}: threshold t = {threshold} exceeds the k + 1 = {k + 1} shares of each secret")
    if threshold < threshold_floor(k):
        raise SecAggAbort(f"site {node}: threshold t = {threshold} is below this site's floor {threshold_floor(k)} for k = {k} "
                          f"neighbours (2 t must exceed its group of {k + 1} plus the {colluders_tolerated(k)} colluder(s) it tolerates, "
                          f"threshold_floor; at least {MIN_THRESHOLD})")


def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private_raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def pairwise_seed(private: X25519PrivateKey, peer_public: bytes, round_id: str) -> bytes:
    """``s_ij``: the same 32 bytes at both ends of an edge."""
    return _kdf(private.exchange(X25519PublicKey.from_public_bytes(peer_public)), f"fedlora-secagg-mask|{round_id}".encode())


def neighbours(nodes: Iterable[int], k: int, rng: random.Random) -> dict[int, list[int]]:
    """A random k-regular graph (k even, k < n; k >= n - 1 means everyone): the circulant graph
    joining each site to the k/2 next and previous ones in a random order."""
    order = sorted(nodes)
    n = len(order)
    if k >= n - 1:
        return {u: [v for v in order if v != u] for u in order}
    if k < 2 or k % 2:
        raise ValueError(f"k must be even and >= 2, got {k}")
    rng.shuffle(order)
    out: dict[int, list[int]] = {u: [] for u in order}
    for pos, u in enumerate(order):
        for step in range(1, k // 2 + 1):
            out[u].append(order[(pos + step) % n])
            out[u].append(order[(pos - step) % n])
    return {u: sorted(set(vs)) for u, vs in out.items()}


@dataclass
class SecAggSite:
    node: int
    peers: list[int]  # this site's neighbours
    threshold: int
    modulus_bits: int
    round_id: str
    _c: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _s: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _b: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    _keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)  # peer -> (c_pk, s_pk)
    _held: dict[int, tuple[tuple[int, bytes], tuple[int, bytes]]] = field(default_factory=dict, repr=False)  # peer -> (b share, sk share)
    _revealed: dict[int, str] = field(default_factory=dict, repr=False)  # peer -> "b" or "sk", once revealed

    # stage 1
    def advertise(self) -> tuple[bytes, bytes]:
        return _raw(self._c.public_key()), _raw(self._s.public_key())

    def _channel(self, peer: int) -> AESGCM:
        return AESGCM(_kdf(self._c.exchange(X25519PublicKey.from_public_bytes(self._keys[peer][0])),
                           f"fedlora-secagg-channel|{self.round_id}".encode()))

    # stage 2
    def check_relayed(self, public_keys: Mapping[int, tuple[bytes, bytes]]) -> None:
        """Refuse (``SecAggAbort``) relayed keys that could make masks cancel or known: a
        peer that is this site or not its neighbour, a key equal to one of this site's own,
        a key relayed twice (for two peers, or as both keys of one), or a key that is no
        usable X25519 point (small-order points give an all-zero exchange)."""
        if self.node in public_keys:
            raise SecAggAbort(f"site {self.node}: the relayed keys name this site itself among its peers")
        strangers = sorted(set(public_keys) - set(self.peers))
        if strangers:
            raise SecAggAbort(f"site {self.node}: keys relayed for {strangers}, which are not among its neighbours "
                              f"{sorted(self.peers)}")
        own = dict(zip(self.advertise(), ("c", "s")))
        seen: dict[bytes, tuple[int, str]] = {}
        for peer in sorted(public_keys):
            pair = tuple(public_keys[peer])
            if len(pair) != 2:
                raise SecAggAbort(f"site {self.node}: peer {peer} has {len(pair)} keys relayed, not 2 (c and s)")
            for which, key, mine in zip(("c", "s"), pair, (self._c, self._s)):
                key = bytes(key)
                if key in own:
                    raise SecAggAbort(f"site {self.node}: the {which} key relayed for peer {peer} is this site's own {own[key]} "
                                      "public key (a reflected key would cancel its pairwise masks)")
                if key in seen:
                    raise SecAggAbort(f"site {self.node}: the {which} key relayed for peer {peer} repeats the {seen[key][1]} key "
                                      f"of peer {seen[key][0]} (repeated keys would cancel its pairwise masks)")
                seen[key] = (peer, which)
                try:
                    mine.exchange(X25519PublicKey.from_public_bytes(key))
                except ValueError as e:
                    raise SecAggAbort(f"site {self.node}: the {which} key relayed for peer {peer} is not a usable X25519 key: "
                                      f"{e}") from None

    def share_keys(self, public_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Encrypted share pairs, one per neighbour whose keys arrived (others have dropped);
        the keys are checked first (``check_relayed``)."""
        self.check_relayed(public_keys)
        self._keys = {p: (bytes(public_keys[p][0]), bytes(public_keys[p][1])) for p in self.peers if p in public_keys}
        if len(self._keys) + 1 < self.threshold:  # its own share counts towards its self mask's t
            raise SecAggAbort(f"site {self.node}: only {len(self._keys)} neighbours advertised keys; with its own share that is "
                              f"fewer than the threshold {self.threshold}")
        live = sorted(self._keys)
        b_shares = shamir.split(self._b, self.threshold, len(live) + 1)
        s_shares = shamir.split(_private_raw(self._s), self.threshold, len(live) + 1)
        self._held[self.node] = (b_shares[-1], s_shares[-1])  # its own share: revealed only for its self mask
        out = {}
        for peer, bs, ss in zip(live, b_shares, s_shares):
            plain = bs[0].to_bytes(2, "big") + bs[1] + ss[0].to_bytes(2, "big") + ss[1]
            nonce = os.urandom(12)
            out[peer] = nonce + self._channel(peer).encrypt(nonce, plain, f"{self.node}->{peer}|{self.round_id}".encode())
        return out

    def receive_shares(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Decrypt the share pairs the neighbours sent this site (via the coordinator)."""
        n = shamir.SHARE_BYTES
        for peer, blob in ciphertexts.items():
            if peer not in self._keys:
                raise SecAggAbort(f"site {self.node}: a share from {peer}, which is not a neighbour that advertised keys")
            try:
                plain = self._channel(peer).decrypt(blob[:12], blob[12:], f"{peer}->{self.node}|{self.round_id}".encode())
            except InvalidTag:
                raise SecAggAbort(f"site {self.node}: the share from {peer} does not authenticate") from None
            self._held[peer] = ((int.from_bytes(plain[:2], "big"), plain[2:2 + n]),
                                (int.from_bytes(plain[2 + n:4 + n], "big"), plain[4 + n:]))

    # stage 3
    def masked_input(self, values: np.ndarray) -> np.ndarray:
        """``y_i`` over the neighbours that sent shares (they completed stage 2).

        Rule (Bonawitz et al. 2017, round 2): the site continues only if at least t members of
        its group completed stage 2, itself included, i.e. at least t - 1 neighbours' shares
        reached it and authenticated; otherwise ``SecAggAbort`` and no vector (with fewer, too
        few pairwise masks would cover its input once its self mask is opened)."""
        shared = sorted(p for p in self._held if p != self.node)
        if self.node not in self._held or len(shared) + 1 < self.threshold:
            raise SecAggAbort(f"site {self.node}: shares from only {len(shared)} neighbour(s) {shared} reached it; with itself "
                              f"that is fewer than the threshold t = {self.threshold}: refusing to send its masked input")
        m = self.modulus_bits
        y = np.array(values, dtype=masking.word(m))  # arithmetic modulo the word's 2^32 / 2^64, reduced once at the end
        masks = masking.MaskStream(len(y), m)
        masks.add(y, self._b)
        for peer in sorted(p for p in self._held if p != self.node):
            seed = pairwise_seed(self._s, self._keys[peer][1], self.round_id)
            (masks.add if peer > self.node else masks.sub)(y, seed)
        return masking.reduce(y, m)

    # stage 4
    def shared_peers(self) -> set[int]:
        """The neighbours whose shares reached this site at stage 3 (the ones it masked with)."""
        return {p for p in self._held if p != self.node}

    def unshared_survivors(self, survivors: Iterable[int]) -> list[int]:
        """The neighbours among ``survivors`` whose shares never reached this site at stage 3 (so it
        did not mask with them). Bonawitz et al. 2017 require U3 within U2: a view that counts such
        a neighbour alive lets the coordinator strip this site's self mask (its b, from the ones
        shown it survived) and every pairwise mask it did add (the key shares of the ones shown
        dropped), i.e. unmask this site's input alone."""
        return sorted((set(survivors) & set(self.peers)) - self.shared_peers())

    def unmask(self, survivors: Iterable[int], dropped: Iterable[int]) -> dict[int, tuple[str, tuple[int, bytes]]]:
        """Per neighbour: ("b", share) for a survivor, ("sk", share) for a dropped one. Refused
        (``UnmaskRefused``, nothing revealed) for a view that names a peer both survived and
        dropped, leaves out this site, or counts alive a neighbour whose shares did not reach it
        (``unshared_survivors``)."""
        survivors, dropped = list(survivors), list(dropped)
        unshared = self.unshared_survivors(survivors)
        if unshared:
            raise UnmaskRefused(f"site {self.node}: survivors {unshared[:8]} are neighbours whose shares never reached this site "
                                "(it did not mask with them); counting them alive would unmask its input alone")
        alive, gone = set(survivors), set(dropped)
        if alive & gone:
            raise UnmaskRefused(f"site {self.node}: sites {sorted(alive & gone)} are named both survived and dropped")
        if len(alive) < self.threshold:
            raise UnmaskRefused(f"site {self.node}: only {len(alive)} survivors, below the threshold {self.threshold}")
        if self.node not in alive:
            raise UnmaskRefused(f"site {self.node}: the request does not count this site among the survivors; its key share "
                                "would unmask its own input")
        out: dict[int, tuple[str, tuple[int, bytes]]] = {}
        for peer in sorted((alive | gone) & set(self._held)):
            kind = "b" if peer in alive else "sk"
            if self._revealed.get(peer, kind) != kind:
                raise UnmaskRefused(f"site {self.node}: already revealed the {self._revealed[peer]} share of site {peer}; "
                                    f"refusing its {kind} share too (that would unmask its input)")
        for peer in sorted((alive | gone) & set(self._held)):
            kind = "b" if peer in alive else "sk"
            self._revealed[peer] = kind
            out[peer] = (kind, self._held[peer][0 if kind == "b" else 1])
        return out


def site_to_json(site: SecAggSite) -> str:
    """A site's protocol state (its secrets included) as JSON, for the node's own state store
    between stages; it never leaves the site."""
    def share(x: tuple[int, bytes]) -> list:
        return [x[0], x[1].hex()]

    return json.dumps({
        "node": site.node, "peers": site.peers, "threshold": site.threshold, "modulus_bits": site.modulus_bits,
        "round_id": site.round_id, "c": _private_raw(site._c).hex(), "s": _private_raw(site._s).hex(), "b": site._b.hex(),
        "keys": {str(p): [c.hex(), k.hex()] for p, (c, k) in site._keys.items()},
        "held": {str(p): [share(b), share(k)] for p, (b, k) in site._held.items()},
        "revealed": {str(p): kind for p, kind in site._revealed.items()},
    })


def site_from_json(text: str) -> SecAggSite:
    d = json.loads(text)

    def share(x: list) -> tuple[int, bytes]:
        return int(x[0]), bytes.fromhex(x[1])

    return SecAggSite(
        node=int(d["node"]), peers=[int(p) for p in d["peers"]], threshold=int(d["threshold"]), modulus_bits=int(d["modulus_bits"]),
        round_id=str(d["round_id"]), _c=X25519PrivateKey.from_private_bytes(bytes.fromhex(d["c"])),
        _s=X25519PrivateKey.from_private_bytes(bytes.fromhex(d["s"])), _b=bytes.fromhex(d["b"]),
        _keys={int(p): (bytes.fromhex(c), bytes.fromhex(k)) for p, (c, k) in d["keys"].items()},
        _held={int(p): (share(b), share(k)) for p, (b, k) in d["held"].items()},
        _revealed={int(p): str(kind) for p, kind in d["revealed"].items()},
    )


@dataclass
class SecAggCoordinator:
    """Holds what the coordinator legitimately sees: public keys, ciphertexts, masked vectors."""

    graph: dict[int, list[int]]
    threshold: int
    modulus_bits: int
    round_id: str
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)  # sites that completed stage 2

    def relay_keys(self, advertised: Mapping[int, tuple[bytes, bytes]]) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        self.public_keys = dict(advertised)
        return {u: {p: self.public_keys[p] for p in self.graph[u] if p in self.public_keys} for u in self.public_keys}

    def relay_shares(self, sent: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Route each ciphertext to its recipient; ``sent[i][j]`` is i's ciphertext for j."""
        self.shared = set(sent)
        inbox: dict[int, dict[int, bytes]] = {u: {} for u in self.shared}
        for src, boxes in sent.items():
            for dst, blob in boxes.items():
                if dst in inbox:
                    inbox[dst][src] = blob
        return inbox

    def unmask_request(self, masked: Mapping[int, np.ndarray]) -> tuple[list[int], list[int]]:
        survivors = sorted(set(masked) & self.shared)
        if len(survivors) < self.threshold:
            raise SecAggAbort(f"only {len(survivors)} sites sent masked inputs; the threshold is {self.threshold}")
        return survivors, sorted(self.shared - set(masked))

    def aggregate(self, masked: Mapping[int, np.ndarray], responses: Mapping[int, Mapping[int, tuple[str, tuple[int, bytes]]]]) -> np.ndarray:
        """The sum of the survivors' inputs modulo 2^m."""
        m = self.modulus_bits
        survivors, dropped = self.unmask_request(masked)
        shares: dict[tuple[int, str], list[tuple[int, bytes]]] = {}
        for responder, per_peer in responses.items():
            if responder not in survivors:
                continue
            for peer, (kind, share) in per_peer.items():
                shares.setdefault((peer, kind), []).append(share)
        d = len(next(iter(masked.values())))
        total = np.zeros(d, dtype=masking.word(m))  # modulo the word's 2^32 / 2^64, reduced once at the end
        masks = masking.MaskStream(d, m)
        for u in survivors:
            total += masked[u]
        for u in survivors:
            got = shares.get((u, "b"), [])
            if len(got) < self.threshold:
                raise SecAggAbort(f"only {len(got)} shares of site {u}'s self mask, threshold {self.threshold}")
            masks.sub(total, shamir.combine(got, self.threshold))
        for u in dropped:
            got = shares.get((u, "sk"), [])
            if len(got) < self.threshold:
                raise SecAggAbort(f"only {len(got)} key shares of dropped site {u}, threshold {self.threshold}")
            s_u = X25519PrivateKey.from_private_bytes(shamir.combine(got, self.threshold))
            for v in self.graph[u]:
                if v in survivors:  # v added +PRG(s_uv) if u > v, else -PRG(s_uv): undo it
                    seed = pairwise_seed(s_u, self.public_keys[v][1], self.round_id)
                    (masks.sub if u > v else masks.add)(total, seed)
        return masking.reduce(total, m)
