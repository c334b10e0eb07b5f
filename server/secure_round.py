"""The coordinator's side of secure aggregation: drive SecAgg+ stages 2-4 as Message rounds.

Stage 1 rides on the ``train`` (or ``evaluate``) messages: ``site_config`` adds the round's
graph and parameters; each site answers with its public keys instead of its update (or its
metrics), with its signature over them and its certificate when it has signing material
(``fedlora.privacy.key_signing``). ``secure_sum`` then relays keys, each with its signer's
signature and certificate, untouched (``<kind>.secagg_share``: the sites check them against
the federation CA; the coordinator never holds the CA's key, so it cannot sign a key of its
own for a site name), ciphertexts
(``<kind>.secagg_masked``) and the unmask request (``<kind>.secagg_unmask``) and returns the
cohort's unmasked sum (``train``: de-quantised; ``evaluate``: exact integer metrics). Sites
that fail or do not answer within the stage timeout count as dropped; below the threshold
the round aborts (``SecAggAbort``) and nothing is revealed: the cohort's adapter stays as it
was (or its metrics stay unknown).

A site may send any bytes. Every reply is checked against what an honest site sends at that
stage (``key_problem``, ``auth_problem``, ``share_problem``, ``masked_vector``,
``unmask_problem``): a public key that is not a usable X25519 key, a signature without a
certificate (or either larger than a site's), a share reply that does not hold exactly one
ciphertext of the right size per neighbour, a masked vector of the wrong length, dtype or
range, an unmask reply that does not pair each share with a peer and kind it may reveal. A
malformed reply counts as that site dropping out at that stage (its later contributions are
not asked for; at stage 4 only its shares are left out), and the site is named with the
reason in ``failed`` (the cohort's ``sites_failed``); the protocol goes on with the others
while at least the threshold remain.

Parameters: k neighbours (0: all others up to 8 sites, else the smallest even number >=
2 log2 n), threshold t (0: ceil(2 (k + 1) / 3), at least 2 and the sites' floor), modulus bits
``bits + ceil(log2(n + 1))`` so that n sites never overflow (checked). A k or an explicit t the
sites would refuse at stage 1 (``fedlora.privacy.secagg.check_parameters``) is refused before
any round (``validate``); a cohort below ``min_sites`` is skipped unless ``allow_clear``
(``too_small``).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from flwr.app import Array, ConfigRecord, Message, RecordDict

from fedlora.config import SecureAggregationConfig
from fedlora.errors import ConfigError, FedloraError
from fedlora.model import derive_seed
from fedlora.privacy import shamir
from fedlora.privacy.quantization import Quantizer, wire_dtype
from fedlora.privacy.key_signing import MAX_CERT_BYTES, MAX_SIG_BYTES
from fedlora.privacy.secagg import MIN_NEIGHBOURS, SecAggAbort, SecAggCoordinator, neighbours, threshold_floor
from fedlora.privacy.secagg_vector import EVAL_MODULUS_BITS
from fedlora.protocol import (ConsistencyAsk, ConsistencyReply, MaskedAsk, SecAggKeys, ShareAsk, ShareReply, UnmaskAsk, UnmaskReply,
                              arrays, read, record_of)

log = logging.getLogger("fedlora.server")
Exchange = Callable[[list[Message]], dict[int, Message]]


def plan(cfg: SecureAggregationConfig, n: int) -> tuple[int, int, Quantizer]:
    """(k, t, quantiser) for a cohort of n sites; refuses (ValueError naming k, t and the
    sites' floor) a config that cannot work or that every site would refuse at stage 1: k
    below ``MIN_NEIGHBOURS``, t below ``threshold_floor(k)`` or above k + 1. The automatic t is
    never below the floor (raised to it if it were)."""
    if cfg.neighbours:
        k = min(cfg.neighbours, n - 1)
    else:
        k = n - 1 if n <= 8 else min(n - 1, 2 * math.ceil(math.log2(n)))
        if k < n - 1 and k % 2:
            k += 1
    floor = threshold_floor(k)
    if k < MIN_NEIGHBOURS:
        raise ValueError(f"k = {k} neighbour(s) for {n} site(s), below the minimum {MIN_NEIGHBOURS} the sites accept "
                         f"(t = {cfg.threshold or 'automatic'}, floor {floor}): so small a group would isolate a site")
    t = cfg.threshold or max(2, math.ceil(2 * (k + 1) / 3), floor)
    if t > k + 1:
        raise ValueError(f"threshold {t} exceeds the {k + 1} shares of each secret (k = {k} neighbours + the site itself)")
    if t < floor:
        raise ValueError(f"threshold t = {t} is below the sites' floor {floor} for k = {k} neighbours (2 t must exceed each group "
                         f"of {k + 1} plus the colluders it tolerates, fedlora.privacy.secagg.threshold_floor): every site would "
                         "refuse it at stage 1")
    q = Quantizer(cfg.clip_range, cfg.bits, min(64, cfg.bits + math.ceil(math.log2(n + 1))))
    q.check_no_overflow(n)
    return k, t, q


def validate(cfg: SecureAggregationConfig, cohort_sizes: Mapping[str, int]) -> None:
    """Refuse, before any round, a secure-aggregation config that cannot work for a cohort
    that will use it, or whose k or t every site would refuse (ConfigError naming the cohort,
    k, t and the floor; ``plan``)."""
    if not cfg.enabled:
        return
    for name, n in cohort_sizes.items():
        if n >= cfg.min_sites:
            try:
                plan(cfg, n)
            except ValueError as e:
                raise ConfigError("secure_aggregation", f"cohort {name} ({n} sites)", str(e)) from None


def too_small(cfg: SecureAggregationConfig, cohort_sizes: Mapping[str, int]) -> dict[str, str]:
    """Cohort -> why it is skipped for the run: secure aggregation on, fewer than ``min_sites``
    sites, and clear aggregation not allowed (fail closed). {} when secure aggregation is off
    or ``allow_clear``."""
    if not cfg.enabled or cfg.allow_clear:
        return {}
    return {name: (f"{n} site(s), fewer than secure_aggregation.min_sites = {cfg.min_sites}; not aggregated in the clear "
                   "without --allow-clear-aggregation") for name, n in cohort_sizes.items() if n < cfg.min_sites}


KEY_BYTES = 32  # an X25519 public key
SHARE_CIPHERTEXT_BYTES = 12 + 2 * (2 + shamir.SHARE_BYTES) + 16  # nonce, (x, y) of the b and sk shares, AES-GCM tag


def key_problem(key: bytes) -> str:
    """What makes ``key`` unusable as a site's X25519 public key ("" if nothing): not 32 bytes,
    all zero, or a low-order point (an exchange with it gives the all-zero secret, which
    ``cryptography`` refuses: every neighbour would fail)."""
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        return f"a public key of {len(key) if isinstance(key, bytes) else type(key).__name__} bytes, not {KEY_BYTES}"
    if not any(key):
        return "an all-zero public key"
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(key))
    except ValueError:
        return f"a low-order X25519 public key ({key.hex()[:16]}...): no shared secret can be agreed with it"
    return ""


def auth_problem(sig: bytes, cert: bytes) -> str:
    """Stage 1's signature and certificate ("" if fine, also when both are empty: an unsigned
    site): both or neither, neither larger than a site's (the sites verify them; the
    coordinator only keeps an oversized or half-signed reply from being relayed)."""
    if not isinstance(sig, bytes) or not isinstance(cert, bytes):
        return "a signature or certificate that is not bytes"
    if bool(sig) != bool(cert):
        return "a signature without a certificate, or a certificate without a signature"
    if len(sig) > MAX_SIG_BYTES or len(cert) > MAX_CERT_BYTES:
        return f"a signature of {len(sig)} bytes or a certificate of {len(cert)} bytes (at most {MAX_SIG_BYTES} and {MAX_CERT_BYTES})"
    return ""


def advertised_keys(keys: SecAggKeys) -> tuple[bytes, bytes, bytes, bytes]:
    """What ``secure_sum`` takes per site from its stage-1 reply: ``(c_pk, s_pk, sig, cert)``."""
    return keys.c_pk, keys.s_pk, keys.sig, keys.cert


def share_problem(peers: Sequence[int], ciphertexts: Sequence[bytes], expected: Sequence[int]) -> str:
    """Stage 2 ("" if fine): an honest site sends one ciphertext of ``SHARE_CIPHERTEXT_BYTES``
    to each neighbour whose keys it was sent (``expected``), and to no one else."""
    if len(peers) != len(ciphertexts):
        return f"{len(ciphertexts)} share ciphertexts for {len(peers)} peers"
    if len(set(peers)) != len(peers) or set(peers) != set(expected):
        return f"shares for peers {sorted(peers)[:8]}, expected one for each of its neighbours {sorted(expected)[:8]}"
    sizes = sorted({len(c) for c in ciphertexts})
    if sizes and sizes != [SHARE_CIPHERTEXT_BYTES]:
        return f"share ciphertexts of {sizes[:4]} bytes, not {SHARE_CIPHERTEXT_BYTES}"
    return ""


def masked_vector(arr: Array, length: int, wire: np.dtype, modulus_bits: int) -> np.ndarray:
    """Stage 3: the masked vector of one reply, or ValueError naming what an honest site's
    would not be (a dtype other than the round's wire dtype, not ``length`` entries, an entry
    at or above ``2^modulus_bits``)."""
    if str(arr.dtype) != wire.name:
        raise ValueError(f"a masked vector of dtype {arr.dtype}, not the round's {wire.name}")
    if len(arr.data) != length * wire.itemsize or tuple(arr.shape) != (length,):
        raise ValueError(f"a masked vector of shape {tuple(arr.shape)} and {len(arr.data)} bytes, not ({length},) {wire.name}")
    y = np.frombuffer(arr.data, dtype=wire.newbyteorder("<"))
    if modulus_bits < 64 and y.size and int(y.max()) >> modulus_bits:
        raise ValueError(f"a masked vector with an entry {int(y.max())} at or above the modulus 2^{modulus_bits}")
    return y


def unmask_problem(peers: Sequence[int], kinds: Sequence[str], x: Sequence[int], y: Sequence[bytes], may_reveal: Mapping[int, str],
                   max_x: int) -> str:
    """Stage 4 ("" if fine): one share per peer, each a peer this site may hold a share of with
    the kind the request allows (``may_reveal``: peer -> "b" for a survivor, "sk" for a
    dropped one), an index in ``[1, max_x]`` and ``shamir.SHARE_BYTES`` bytes."""
    if not len(peers) == len(kinds) == len(x) == len(y):
        return f"{len(peers)} peers, {len(kinds)} kinds, {len(x)} indices and {len(y)} shares"
    if len(set(peers)) != len(peers):
        return "more than one share for a peer"
    for p, k, i, share in zip(peers, kinds, x, y):
        if may_reveal.get(p) != k:
            return f"a {k!r} share of site {p}, which the request allows only as {may_reveal.get(p)!r}"
        if not 1 <= i <= max_x or len(share) != shamir.SHARE_BYTES:
            return f"a share of site {p} with index {i} (1 to {max_x}) and {len(share)} bytes ({shamir.SHARE_BYTES})"
    return ""


def _common_length(replies: Iterable[RecordDict], wire: np.dtype) -> int:
    """The most common length of the masked vectors in ``replies`` (0 if none can be read)."""
    sizes: Counter[int] = Counter()
    for c in replies:
        try:
            sizes[len(arrays(c, "masked", "secagg_masked")["y"].data) // wire.itemsize] += 1
        except (FedloraError, KeyError, TypeError):
            continue
    return sizes.most_common(1)[0][0] if sizes else 0


class SecureAggregation:
    def __init__(self, cfg: SecureAggregationConfig, seed: int, weight_cap: float = 1000.0) -> None:
        self.cfg, self.seed = cfg, seed
        self.weight_cap = float(weight_cap)  # federation.weight_cap: each site sends w = min(n, cap) / cap
        self._rounds: dict[str, tuple[SecAggCoordinator, Quantizer | None]] = {}
        self.sat_out: dict[str, str] = {}  # round id -> why the cohort sat that sum out (``setup``)

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
            shared |= {"bits": q.bits, "clip_range": float(q.clip_range), "weight_scale": self.weight_cap}
        return {u: shared | {"neighbours": list(graph[u])} for u in nodes}

    def setup(self, cohort: str, nodes: list[int], round_: int, kind: str) -> dict[int, dict[str, Any]] | None:
        """``site_config``, or None when the sampled sites are too few (fewer than ``min_sites``
        or than the threshold needs): then the cohort sits the round out rather than send
        anything in the clear, and ``sat_out[round id]`` says why."""
        kind = "train" if kind == "train" else "evaluate"
        try:
            if len(nodes) < self.cfg.min_sites:
                raise ValueError(f"only {len(nodes)} site(s) sampled, fewer than secure_aggregation.min_sites = {self.cfg.min_sites}")
            return self.site_config(cohort, nodes, round_, kind)
        except ValueError as e:
            log.warning("round %d: cohort %r sits out this %s round: %s", round_, cohort, kind, e)
            self.sat_out[self.round_id(cohort, round_, kind)] = f"sat out this {kind} round: {e}"
            return None

    def secure_sum(self, exchange: Exchange, cohort: str, round_: int, advertised: Mapping[int, tuple[bytes, ...]],
                   kind: str = "train", *, length: int | None = None,
                   failed: dict[int, str] | None = None) -> tuple[np.ndarray, list[int], Quantizer | None]:
        """Stages 2-4 over the sites that advertised usable keys: the unmasked sum (integers
        modulo 2^m), the survivors, and the quantiser to read a ``train`` sum with. When the keys
        came signed, a consistency check runs between stages 3 and 4 (``<kind>.secagg_check``):
        every survivor signs the survivor set, fewer than t signatures abort, and each site asked to
        unmask gets its group's signatures (the sites verify them; ``secagg_site.check``).
        ``advertised``: node -> ``(c_pk, s_pk)`` or ``(c_pk, s_pk, sig, cert)``
        (``advertised_keys``); each site's signature and certificate are relayed with its keys.
        Keys, signatures, certificates, ciphertexts and shares travel as lists of raw bytes in
        the record ``secagg``.

        ``length``: the entries of every site's vector (None: the most common length). ``failed``
        is filled, also when the round aborts, with node -> reason for every advertised site left
        out of the sum (stages 1-3: no reply, an error or a malformed reply) and every survivor
        whose unmask reply was malformed (its shares are not used)."""
        round_id = self.round_id(cohort, round_, kind)
        coord, q = self._rounds.pop(round_id)
        failed = {} if failed is None else failed

        def drop(u: int, stage: str, why: str) -> None:
            log.warning("round %d: node %s counts as a dropout of %s's %s sum at %s: %s", round_, u, cohort, kind, stage, why)
            failed.setdefault(u, f"{kind}.{stage}: {why}")

        def stage(name: str, asks: Mapping[int, Any], benign: bool = False) -> dict[int, RecordDict]:
            """The replies without an error; with ``benign`` a site that errs or does not answer is not named."""
            msgs = [Message(RecordDict({"secagg": record_of(a)}), node, f"{kind}.{name}", group_id=str(round_)) for node, a in asks.items()]
            got = exchange(msgs)
            for u in asks:
                if not benign and (u not in got or got[u].has_error()):
                    drop(u, name, f"error reply: {got[u].error.reason}" if u in got else "no reply within the stage timeout")
            return {n: r.content for n, r in got.items() if n in asks and not r.has_error()}

        def readable(got: Mapping[int, RecordDict], fn: Callable[[int, RecordDict], Any], name: str) -> dict[int, Any]:
            """Each reply read through the protocol and checked; a malformed one counts as a dropout, named."""
            out = {}
            for u, c in got.items():
                try:
                    out[u] = fn(u, c)
                except (FedloraError, ValueError) as e:
                    drop(u, name, f"malformed reply: {e}")
            return out

        keys, auth = {}, {}
        for u, (c_pk, s_pk, *signed) in advertised.items():
            sig, cert = (signed + [b"", b""])[:2]
            problem = key_problem(c_pk) or key_problem(s_pk) or auth_problem(sig, cert)
            if problem:
                drop(u, "keys", f"malformed reply: {problem}")
            else:
                keys[u], auth[u] = (c_pk, s_pk), (sig, cert)
        if len(keys) < coord.threshold:
            raise SecAggAbort(f"only {len(keys)} site(s) advertised usable keys; the threshold is {coord.threshold}")
        relayed = coord.relay_keys(keys)

        def read_shares(u: int, c: RecordDict) -> dict[int, bytes]:
            r = read(ShareReply, c, f"{kind}.secagg_share")
            problem = share_problem(r.peers, r.ciphertexts, list(relayed[u]))
            if problem:
                raise ValueError(problem)
            return dict(zip(r.peers, r.ciphertexts))

        def share_ask(ks: Mapping[int, tuple[bytes, bytes]]) -> ShareAsk:
            signed = any(auth[p][0] for p in ks)  # all unsigned: the record stays as before signatures
            return ShareAsk(round_id=round_id, peers=tuple(ks), c_pk=tuple(c for c, _ in ks.values()), s_pk=tuple(s for _, s in ks.values()),
                            certs=tuple(auth[p][1] for p in ks) if signed else (), sigs=tuple(auth[p][0] for p in ks) if signed else ())

        sent = readable(stage("secagg_share", {u: share_ask(ks) for u, ks in relayed.items()}), read_shares, "secagg_share")
        inbox = coord.relay_shares(sent)
        wire = wire_dtype(coord.modulus_bits)
        got = stage("secagg_masked", {u: MaskedAsk(round_id=round_id, peers=tuple(box), ciphertexts=tuple(box.values()), wire_dtype=wire.name)
                                      for u, box in inbox.items()})
        if length is None:
            length = _common_length(got.values(), wire)
        masked = readable(got, lambda u, c: masked_vector(arrays(c, "masked", f"{kind}.secagg_masked")["y"], length, wire,
                                                          coord.modulus_bits), "secagg_masked")
        survivors, dropped = coord.unmask_request(masked)
        allowed = {p: "b" for p in survivors} | {p: "sk" for p in dropped}
        signatures: dict[int, bytes] = {}
        if any(auth[u][0] for u in keys):  # signed keys: the consistency check before anyone unmasks
            def read_check(u: int, c: RecordDict) -> bytes:
                sig = read(ConsistencyReply, c, f"{kind}.secagg_check").sig
                if not sig or len(sig) > MAX_SIG_BYTES:
                    raise ValueError(f"a survivor-set signature of {len(sig)} bytes (1 to {MAX_SIG_BYTES})")
                return sig

            signatures = readable(stage("secagg_check", {u: ConsistencyAsk(round_id=round_id, survivors=tuple(survivors),
                                                                           dropped=tuple(dropped)) for u in survivors}),
                                  read_check, "secagg_check")
            if len(signatures) < coord.threshold:
                raise SecAggAbort(f"only {len(signatures)} survivor(s) signed the survivor set; the threshold is {coord.threshold}")

        def unmask_ask(u: int) -> UnmaskAsk:
            group = [p for p in (u, *coord.graph.get(u, ())) if p in signatures]
            return UnmaskAsk(round_id=round_id, survivors=tuple(survivors), dropped=tuple(dropped), signers=tuple(group),
                             sigs=tuple(signatures[p] for p in group))

        def read_unmask(u: int, c: RecordDict) -> dict[int, tuple[str, tuple[int, bytes]]]:
            r = read(UnmaskReply, c, f"{kind}.secagg_unmask")
            mine = set(coord.graph.get(u, ())) | {u}
            problem = unmask_problem(r.peers, r.kinds, r.x, r.y, {p: k for p, k in allowed.items() if p in mine}, len(coord.graph) + 1)
            if problem:
                raise ValueError(problem)
            return {p: (k, (x, y)) for p, k, x, y in zip(r.peers, r.kinds, r.x, r.y)}

        asked = [u for u in survivors if u in signatures] if signatures else survivors
        responses = readable(stage("secagg_unmask", {u: unmask_ask(u) for u in asked}, benign=True), read_unmask, "secagg_unmask")
        return coord.aggregate(masked, responses), survivors, q
