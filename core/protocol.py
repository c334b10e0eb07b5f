"""Every message between the coordinator and a site, declared once (the round-message seam).

Each record that crosses the wire is a frozen dataclass below; each field names its wire key
(``metadata["key"]``, default the field name), its type (the annotation) and the entry of the
release catalogue it falls under (``metadata["release"]``, see ``fedlora.privacy.releases``) when
it travels from a site to the coordinator. ``to_record`` / ``from_record`` are the only way
the coordinator and the sites build and read messages: a missing key, a value of the wrong type
or an unknown key is a ``ProtocolError`` naming the message, the record and the key.

Messages (``message_type``: request records -> reply records):

* ``query``:    ``config`` (``ModelOffer``), ``hello`` (``HelloAsk``), ``cohorts`` (``CohortsOffer``) -> ``site`` (``SiteInfo``)
* ``train``:    ``config`` (``RoundPlan`` + ``PrivacyAsk`` + ``ClientDpAsk``), ``adapter`` (arrays),
                optionally ``secagg`` (``SecAggSetup``)
                -> ``update`` (arrays) + ``metrics`` (``TrainMetrics``), or ``secagg`` (``SecAggKeys``);
                   with DP also ``privacy_event`` (the event dict) + ``privacy`` (``PrivacyStatus``)
* ``evaluate``: the same request records (the adapter to evaluate)
                -> ``metrics`` (``EvalMetrics``), or ``secagg`` (``SecAggKeys``), or nothing
                   (``metrics_kept`` in ``EvalKept``: the site kept its metrics); with noised
                   metrics also ``privacy_event`` + ``privacy``
* ``<kind>.secagg_share``:  ``secagg`` (``ShareAsk``)   -> ``secagg`` (``ShareReply``)
* ``<kind>.secagg_masked``: ``secagg`` (``MaskedAsk``)  -> ``masked`` (one array ``y``)
* ``<kind>.secagg_check``:  ``secagg`` (``ConsistencyAsk``) -> ``secagg`` (``ConsistencyReply``), when keys are signed
* ``<kind>.secagg_unmask``: ``secagg`` (``UnmaskAsk``)  -> ``secagg`` (``UnmaskReply``)
"""

from __future__ import annotations

import functools
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .errors import ProtocolError


def _key(name: str, release: str | None = None, **kw: Any) -> Any:
    meta = {"key": name}
    if release:
        meta["release"] = release
    return field(metadata=meta, **kw)


@dataclass(frozen=True)
class Part:
    """A record's fields; ``record`` is its name in the message, ``kind`` config or metric."""

    record: ClassVar[str] = "config"
    kind: ClassVar[str] = "config"
    prefix: ClassVar[str] = ""  # keys of this part share a record with others (``privacy.``...)

    @classmethod
    def wire_keys(cls) -> dict[str, str]:
        """field name -> wire key"""
        return {f.name: f.metadata.get("key", f.name) for f in fields(cls)}

    @classmethod
    def releases(cls) -> dict[str, str | None]:
        """wire key -> release catalogue name (None for coordinator -> site fields)"""
        return {f.metadata.get("key", f.name): f.metadata.get("release") for f in fields(cls)}

    def flat(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            out[f.metadata.get("key", f.name)] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def read(cls, rec: Mapping[str, Any], message: str) -> Any:
        hints = _hints(cls)
        kwargs = {}
        for f in fields(cls):
            key = f.metadata.get("key", f.name)
            if key not in rec:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ProtocolError(f"{message}: record {cls.record!r} lacks key {key!r}")
                continue
            kwargs[f.name] = _coerce(rec[key], hints[f.name], f"{message}: {cls.record}.{key}")
        part = cls(**kwargs)
        problem = part.problem()
        if problem:
            raise ProtocolError(f"{message}: record {cls.record!r}: {problem}")
        return part

    def problem(self) -> str:
        """What makes these values unusable ("" if nothing): checked on every read, so no handler
        ever works with an out-of-range value (a zero-step plan, an unknown accountant, a NaN)."""
        return ""


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` once per class (it evaluates the string annotations each call:
    ~0.7 ms a message, the largest share of a site's secure-aggregation CPU besides the masks)."""
    return typing.get_type_hints(cls)


def _coerce(v: Any, hint: Any, where: str) -> Any:
    text = str(hint)
    optional = "None" in text
    if v is None and optional:
        return None
    base = text.replace(" | None", "").replace("typing.Optional[", "").rstrip("]") if optional else text

    def fail(expected: str) -> typing.NoReturn:
        raise ProtocolError(f"{where}: expected {expected}, got {type(v).__name__} {str(v)[:40]!r}")

    if base in ("int", "<class 'int'>"):
        if isinstance(v, bool) or not isinstance(v, int):
            fail("an integer")
        return int(v)
    if base in ("float", "<class 'float'>"):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            fail("a number")
        return float(v)
    if base in ("bool", "<class 'bool'>"):
        if not isinstance(v, bool):
            fail("true or false")
        return v
    if base in ("str", "<class 'str'>"):
        if not isinstance(v, str):
            fail("a string")
        return v
    if base in ("bytes", "<class 'bytes'>"):
        if not isinstance(v, bytes):
            fail("bytes")
        return v
    if base.startswith("tuple[str"):
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            fail("a list of strings")
        return tuple(v)
    if base.startswith("tuple[int"):
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            fail("a list of integers")
        return tuple(int(x) for x in v)
    if base.startswith("tuple[float"):
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            fail("a list of numbers")
        return tuple(float(x) for x in v)
    if base.startswith("tuple[bytes"):
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, bytes) for x in v):
            fail("a list of bytes")
        return tuple(v)
    return v


# ---- query ---------------------------------------------------------------------------
@dataclass(frozen=True)
class HelloAsk(Part):
    """A fresh random challenge the joining site signs with its certificate's key (record ``hello`` of ``query``)."""

    record: ClassVar[str] = "hello"
    challenge: bytes = _key("challenge")


@dataclass(frozen=True)
class CohortsOffer(Part):
    """The cohorts this run trains and each one's labels (record ``cohorts`` of ``query``; public,
    from the run's config): a joining site checks its own cohort is one of them and its data
    against that cohort's labels before it joins, and stops at its side on a mismatch.
    ``labels[i]`` is the JSON list of ``names[i]``'s labels."""

    record: ClassVar[str] = "cohorts"
    names: tuple[str, ...] = _key("names")
    labels: tuple[str, ...] = _key("labels")

    def labels_of(self, cohort: str) -> list[str] | None:
        """The labels of ``cohort``, or None when this run does not train it."""
        for name, text in zip(self.names, self.labels, strict=True):
            if name == cohort:
                return [str(x) for x in json.loads(text)]
        return None


@dataclass(frozen=True)
class SiteInfo(Part):
    """A site's name and cohort; with signing material its certificate (DER) and its signature
    over the challenge, name and cohort (``key_signing.hello_statement``); b"" when it has none."""

    record: ClassVar[str] = "site"
    name: str = _key("name", "query.identity")
    cohort: str = _key("cohort", "query.identity")
    cert: bytes = _key("cert", "query.identity", default=b"")
    sig: bytes = _key("sig", "query.identity", default=b"")


# ---- train / evaluate requests --------------------------------------------------------
@dataclass(frozen=True)
class AdapterRef(Part):
    """Which global adapter a ``train`` / ``evaluate`` message is about (record ``adapter_ref``):
    ``records.adapter_digest`` of its ``adapter`` record. The coordinator leaves the adapter
    itself out when the site already holds it (it acknowledged a message with the same digest);
    a site uses only an adapter whose bytes hash to this digest, received now or kept from
    before (``fedlora.client.adapter_cache``), and answers ``ADAPTER_NOT_HELD_CODE`` when it has
    none, so the coordinator sends it in full."""

    record: ClassVar[str] = "adapter_ref"
    digest: str = _key("digest")


@dataclass(frozen=True)
class RoundPlan(Part):
    """The public round plan (shared by every site of a cohort). ``seed`` is the run's public
    seed: it fixes the initial adapter and the data split, never a DP secret."""

    round: int = _key("round")
    cohort: str = _key("cohort")
    labels: tuple[str, ...] = _key("labels")
    seed: int = _key("seed")
    wire_dtype: str = _key("wire_dtype")
    local_steps: int = _key("train.local_steps")
    local_epochs: float = _key("train.local_epochs")
    batch_size: int = _key("train.batch_size")
    optimizer: str = _key("train.optimizer")
    learning_rate: float = _key("train.learning_rate")
    weight_decay: float = _key("train.weight_decay")
    max_grad_norm: float = _key("train.max_grad_norm")
    eval_fraction: float = _key("train.eval_fraction")
    rounds: int = _key("train.rounds")
    eval_every: int = _key("train.eval_every", default=1)
    momentum: float = _key("train.momentum", default=0.0)
    max_local_steps: int = _key("train.max_local_steps", default=0)
    proximal_mu: float = _key("train.proximal_mu", default=0.0)  # FedProx's mu (the strategy's ``site_options``); 0: none

    def problem(self) -> str:
        if not 0 <= self.momentum < 1:
            return f"momentum = {self.momentum} must be in [0, 1)"
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            return f"proximal_mu = {self.proximal_mu} must be finite and >= 0"
        if self.max_local_steps < 0:
            return f"max_local_steps = {self.max_local_steps} is below 0"
        for name in ("round", "rounds", "local_steps", "batch_size", "eval_every"):
            low = 0 if name == "round" else 1
            if getattr(self, name) < low:
                return f"{name} = {getattr(self, name)} is below {low}"
        if not (self.local_epochs >= 0 and math.isfinite(self.local_epochs)):
            return f"local_epochs = {self.local_epochs} must be finite and >= 0"
        if not 0 < self.eval_fraction < 1:
            return f"eval_fraction = {self.eval_fraction} must be in (0, 1)"
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0 and math.isfinite(self.weight_decay)
                and math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            return "learning_rate, weight_decay and max_grad_norm must be finite (learning_rate > 0, max_grad_norm >= 0)"
        if self.optimizer not in ("adamw", "sgd"):
            return f"optimizer {self.optimizer!r} is not adamw or sgd"
        if len(set(self.labels)) != len(self.labels) or len(self.labels) == 1:
            return f"labels {list(self.labels)[:8]} must be distinct, and none or at least two (none: instruction data without classes)"
        return ""


@dataclass(frozen=True)
class PrivacyAsk(Part):
    """What the coordinator asks of the sites' privacy: a request, never an order (``fedlora.privacy.policy``)."""

    dp: bool = _key("privacy.dp", default=False)
    epsilon: float = _key("privacy.epsilon", default=8.0)
    delta: float = _key("privacy.delta", default=0.0)
    max_grad_norm: float = _key("privacy.max_grad_norm", default=1.0)
    noise_multiplier: float = _key("privacy.noise_multiplier", default=0.0)
    accountant: str = _key("privacy.accountant", default="rdp")
    grad_sample_mode: str = _key("privacy.grad_sample_mode", default="hooks")
    eval_metrics: str = _key("privacy.eval_metrics", default="site")

    def problem(self) -> str:
        if self.accountant not in ("rdp", "prv"):
            return f"accountant {self.accountant!r} is not rdp or prv"
        if self.grad_sample_mode not in ("hooks", "ghost"):
            return f"grad_sample_mode {self.grad_sample_mode!r} is not hooks or ghost"
        if self.eval_metrics not in ("site", "noised", "public"):
            return f"eval_metrics {self.eval_metrics!r} is not site, noised or public"
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            return f"epsilon = {self.epsilon} must be finite and > 0"
        if not 0 <= self.delta < 1:
            return f"delta = {self.delta} must be in [0, 1)"
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            return f"max_grad_norm = {self.max_grad_norm} must be finite and > 0"
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            return f"noise_multiplier = {self.noise_multiplier} must be finite and >= 0"
        return ""


@dataclass(frozen=True)
class ClientDpAsk(Part):
    """Client-level DP for this round: clip to C; with site noise, each site draws its own
    share ``N(0, (z C)^2 / m)`` from public z and m with its own secret randomness."""

    client_dp: bool = _key("privacy.client_dp", default=False)
    clip_norm: float = _key("privacy.client_clip_norm", default=1.0)
    noise: str = _key("privacy.client_noise", default="coordinator")
    noise_multiplier: float = _key("privacy.client_noise_multiplier", default=0.0)
    sites: int = _key("privacy.client_sites", default=1)

    def problem(self) -> str:
        if self.client_dp and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            return f"client_clip_norm = {self.clip_norm} must be finite and > 0"
        if self.noise not in ("coordinator", "sites"):
            return f"client_noise {self.noise!r} is not coordinator or sites"
        if not math.isfinite(self.noise_multiplier) or self.noise_multiplier < 0 or self.sites < 1:
            return f"client noise multiplier {self.noise_multiplier} over {self.sites} site(s)"
        return ""


@dataclass(frozen=True)
class SecAggSetup(Part):
    """One site's view of a secure-aggregation instance (record ``secagg`` of its message)."""

    record: ClassVar[str] = "secagg"
    round_id: str = _key("round_id")
    threshold: int = _key("threshold")
    modulus_bits: int = _key("modulus_bits")
    neighbours: tuple[int, ...] = _key("neighbours")
    bits: int | None = _key("bits", default=None)
    clip_range: float | None = _key("clip_range", default=None)
    weight_scale: float | None = _key("weight_scale", default=None)


# ---- train / evaluate replies ---------------------------------------------------------
@dataclass(frozen=True)
class TrainMetrics(Part):
    record: ClassVar[str] = "metrics"
    kind: ClassVar[str] = "metric"
    num_examples: int = _key("num_examples", "train.size")
    steps: int = _key("steps", "train.plan")
    train_loss: float | None = _key("train_loss", "train.loss", default=None)
    train_seconds: float | None = _key("train_seconds", "train.seconds", default=None)
    update_unclipped: int | None = _key("update_unclipped", "train.client_clip_bit", default=None)


@dataclass(frozen=True)
class EvalMetrics(Part):
    record: ClassVar[str] = "metrics"
    kind: ClassVar[str] = "metric"
    eval_loss: float = _key("eval_loss", "evaluate.metrics")
    accuracy: float = _key("accuracy", "evaluate.metrics")
    num_examples: int = _key("num_examples", "evaluate.metrics")
    label_counts: tuple[int, ...] = _key("label_counts", "evaluate.metrics")
    eval_seconds: float | None = _key("eval_seconds", "evaluate.seconds", default=None)


@dataclass(frozen=True)
class EvalKept(Part):
    """The site evaluated and kept its metrics (policy ``eval_metrics = "site"``)."""

    record: ClassVar[str] = "kept"
    metrics_kept: bool = _key("metrics_kept", "evaluate.kept", default=True)


@dataclass(frozen=True)
class PrivacyStatus(Part):
    """The site's attestation of its budget beside its privacy event (record ``privacy``)."""

    record: ClassVar[str] = "privacy"
    epsilon_spent: float = _key("epsilon_spent", "privacy.status")
    budget_epsilon: float = _key("budget_epsilon", "privacy.status")
    delta: float = _key("delta", "privacy.status")
    delta_rule: str = _key("delta_rule", "privacy.status")
    noise: str = _key("noise", "privacy.status", default="secret")  # secret | reproducible
    eval_metrics: str = _key("eval_metrics", "privacy.status", default="site")
    public_size: int = _key("public_size", "privacy.status", default=0)


@dataclass(frozen=True)
class SecAggKeys(Part):
    """A site's two public keys and, when it has signing material, its ECDSA signature over them
    and its certificate (DER), ``fedlora.privacy.key_signing``; b"" when unsigned."""

    record: ClassVar[str] = "secagg"
    c_pk: bytes = _key("c_pk", "secagg.keys")
    s_pk: bytes = _key("s_pk", "secagg.keys")
    sig: bytes = _key("sig", "secagg.keys", default=b"")
    cert: bytes = _key("cert", "secagg.keys", default=b"")

    def problem(self) -> str:
        if bool(self.sig) != bool(self.cert):
            return "a signature without a certificate, or a certificate without a signature"
        return ""


# ---- secure-aggregation stages 2-4 ----------------------------------------------------
@dataclass(frozen=True)
class ShareAsk(Part):
    record: ClassVar[str] = "secagg"
    round_id: str = _key("round_id")
    peers: tuple[int, ...] = _key("peers")
    c_pk: tuple[bytes, ...] = _key("c_pk")
    s_pk: tuple[bytes, ...] = _key("s_pk")
    certs: tuple[bytes, ...] = _key("certs", default=())  # each peer's certificate (DER), b"" if it sent none
    sigs: tuple[bytes, ...] = _key("sigs", default=())  # each peer's signature over its keys, b"" if none

    def problem(self) -> str:
        n = len(self.peers)
        if len(self.c_pk) != n or len(self.s_pk) != n:
            return f"{len(self.c_pk)} c keys and {len(self.s_pk)} s keys for {n} peers"
        if (self.certs or self.sigs) and not len(self.certs) == len(self.sigs) == n:
            return f"{len(self.certs)} certificates and {len(self.sigs)} signatures for {n} peers (none, or one of each per peer)"
        return ""


@dataclass(frozen=True)
class ShareReply(Part):
    record: ClassVar[str] = "secagg"
    peers: tuple[int, ...] = _key("peers", "secagg.shares")
    ciphertexts: tuple[bytes, ...] = _key("ciphertexts", "secagg.shares")


@dataclass(frozen=True)
class MaskedAsk(Part):
    record: ClassVar[str] = "secagg"
    round_id: str = _key("round_id")
    peers: tuple[int, ...] = _key("peers")
    ciphertexts: tuple[bytes, ...] = _key("ciphertexts")
    wire_dtype: str = _key("wire_dtype")


@dataclass(frozen=True)
class ConsistencyAsk(Part):
    """The survivor set the coordinator will unmask: each survivor signs it (Bonawitz et al. 2017, round 3)."""

    record: ClassVar[str] = "secagg"
    round_id: str = _key("round_id")
    survivors: tuple[int, ...] = _key("survivors")
    dropped: tuple[int, ...] = _key("dropped")


@dataclass(frozen=True)
class ConsistencyReply(Part):
    """A survivor's signature over the set (``key_signing.survivor_statement``); b"" from a site that cannot sign."""

    record: ClassVar[str] = "secagg"
    sig: bytes = _key("sig", "secagg.check", default=b"")


@dataclass(frozen=True)
class UnmaskAsk(Part):
    """The survivors and dropped sites, and, after a consistency check, the signatures over that
    set of the asked site's neighbours (``signers[i]`` signed ``sigs[i]``)."""

    record: ClassVar[str] = "secagg"
    round_id: str = _key("round_id")
    survivors: tuple[int, ...] = _key("survivors")
    dropped: tuple[int, ...] = _key("dropped")
    signers: tuple[int, ...] = _key("signers", default=())
    sigs: tuple[bytes, ...] = _key("sigs", default=())

    def problem(self) -> str:
        if len(self.signers) != len(self.sigs):
            return f"{len(self.signers)} signers and {len(self.sigs)} signatures"
        return ""


@dataclass(frozen=True)
class UnmaskReply(Part):
    record: ClassVar[str] = "secagg"
    peers: tuple[int, ...] = _key("peers", "secagg.unmask")
    kinds: tuple[str, ...] = _key("kinds", "secagg.unmask")
    x: tuple[int, ...] = _key("x", "secagg.unmask")
    y: tuple[bytes, ...] = _key("y", "secagg.unmask")


# ---- building and reading whole messages ----------------------------------------------
def record_of(*parts: Part) -> ConfigRecord | MetricRecord:
    """One record from parts that share it (e.g. ``RoundPlan`` + ``PrivacyAsk`` in ``config``)."""
    flat: dict[str, Any] = {}
    for p in parts:
        flat.update(p.flat())
    return MetricRecord(flat) if parts and parts[0].kind == "metric" else ConfigRecord(flat)


def content(parts: Mapping[str, ConfigRecord | MetricRecord | ArrayRecord]) -> RecordDict:
    return RecordDict(dict(parts))


def read(cls: type, content_: RecordDict, message: str, record: str | None = None) -> Any:
    """Read one part from a message's content; ``ProtocolError`` if its record is missing."""
    name = record or cls.record
    if name not in content_:
        raise ProtocolError(f"{message}: the message has no record {name!r}")
    return cls.read(content_[name], message)


def read_event(content_: RecordDict, message: str) -> tuple[dict[str, Any], PrivacyStatus] | None:
    """The privacy event and status a reply attests, or None if it carries none."""
    if "privacy_event" not in content_:
        return None
    if "privacy" not in content_:
        raise ProtocolError(f"{message}: a privacy event without the site's privacy status")
    return dict(content_["privacy_event"]), PrivacyStatus.read(content_["privacy"], message)


def arrays(content_: RecordDict, name: str, message: str) -> ArrayRecord:
    if name not in content_ or not isinstance(content_[name], ArrayRecord):
        raise ProtocolError(f"{message}: the message has no array record {name!r}")
    return content_[name]


# Every message type and the parts of its request and reply: what the contract test walks and
# what the README's "what the coordinator sees" table is checked against.
MESSAGES: dict[str, dict[str, tuple[type, ...]]] = {
    "query": {"request": (HelloAsk, CohortsOffer), "reply": (SiteInfo,)},
    "train": {"request": (RoundPlan, PrivacyAsk, ClientDpAsk, SecAggSetup, AdapterRef),
              "reply": (TrainMetrics, SecAggKeys, PrivacyStatus)},
    "evaluate": {"request": (RoundPlan, PrivacyAsk, SecAggSetup, AdapterRef), "reply": (EvalMetrics, EvalKept, SecAggKeys, PrivacyStatus)},
    "secagg_share": {"request": (ShareAsk,), "reply": (ShareReply,)},
    "secagg_masked": {"request": (MaskedAsk,), "reply": ()},
    "secagg_unmask": {"request": (UnmaskAsk,), "reply": (UnmaskReply,)},
}
# arrays and records that are not parts: site -> coordinator, with their release names
ARRAY_RELEASES = {"train": {"update": "train.update", "privacy_event": "privacy.event"},
                  "evaluate": {"privacy_event": "privacy.event"},
                  "secagg_masked": {"masked": "secagg.masked"}}


def site_releases() -> dict[str, dict[str, str]]:
    """message type -> {wire key: release name} of everything a site sends the coordinator."""
    out: dict[str, dict[str, str]] = {}
    for message, sides in MESSAGES.items():
        keys: dict[str, str] = {}
        for part in sides["reply"]:
            keys |= {k: r for k, r in part.releases().items() if r}
        keys |= ARRAY_RELEASES.get(message, {})
        out[message] = keys
    return out
