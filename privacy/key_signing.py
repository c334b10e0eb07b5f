"""Authenticated SecAgg keys: a site signs its two public keys, its peers check the signature
against the federation CA (DESIGN.md section 7, rules 4 and 5). Pure ``cryptography``, no Flower.

Without this, the coordinator relays the X25519 keys ``(c_pk, s_pk)`` unauthenticated and can
substitute its own for any peer's: it then agrees every pairwise channel and mask seed with the
victim and unmasks the victim's update. With it, each relayed key comes with

* the signer's X.509 certificate (DER on the wire): issued by the federation CA (``ca.pem`` of
  ``fedlora certs``, whose key the operator keeps offline, never on the coordinator), subject
  common name = the site's name, an EC P-256 (or P-384) public key, not a CA, extended key usage
  ``clientAuth`` (so the coordinator's own TLS certificate, ``serverAuth`` only, signed by the
  same CA, is not a site certificate), valid now;
* an ECDSA signature (P-256 / SHA-256, or P-384 / SHA-384) by that certificate's key over ``statement(...)``.

What is signed (``statement``), a canonical byte string: ``DOMAIN`` followed by, in this order,
each field as a 4-byte big-endian length and its bytes::

    round_id  cohort  round (decimal ASCII)  kind  request  site name  c_pk (32 bytes)  s_pk (32 bytes)

(text fields UTF-8). ``round_id`` is the instance id of ``SecAggSetup``; ``cohort``, ``round`` and
``kind`` are what the site itself knows the sum is for (``SumOf``; empty, 0 and empty when
unknown); ``request`` is the SHA-256 of everything the site was asked for this sum except its own
neighbour list (``fedlora.client.secagg_site.request_digest``: the setup's threshold, modulus,
quantiser and weight scale, the round plan, the privacy asks, the adapter). The verifier rebuilds
the statement from its *own* round id, sum and request and the name in the peer's certificate, so
a signature made for another round, sum, kind or site, over other keys, or by a peer that was
asked something else (a coordinator sending each site its own setup, e.g. a weight scale that
zeroes every peer's contribution but the victim's), does not verify.

What a verifier checks (``verify_peers``), refusing with ``KeyAuthError`` naming the peer and the
reason: a signature and a certificate are present; the certificate chains to the CA and meets
the rules above; the signature verifies; no two peers carry the same name; no peer carries the
verifier's own name (a reflected or replayed copy of its own keys). Which node id a name sits
under is the coordinator's to say and is not authenticated; what is, is that every key belongs
to a distinct CA-certified site other than the verifier, so the coordinator cannot plant a key
whose secret it holds (it holds no site certificate's key), and one colluding site cannot fill
several slots.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.errors import FedloraError

DOMAIN = b"fedlora-secagg-keys/v1"
CURVE = ec.SECP256R1  # new keys (InMemoryCA, fedlora certs): a P-256 verification costs ~0.09 ms against P-384's ~0.6 ms
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)  # certificate folders made with P-384 keys stay valid


def hash_for(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> hashes.HashAlgorithm:
    """The hash an ECDSA signature by ``key`` uses: SHA-256 for P-256, SHA-384 for P-384."""
    return hashes.SHA384() if key.curve.key_size > 256 else hashes.SHA256()


def _curve_ok(key: object) -> bool:
    return isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) and isinstance(key.curve, ACCEPTED_CURVES)
ORGANIZATION = "fedlora federation"
MAX_CERT_BYTES = 4096  # a P-384 site certificate is about 500 bytes of DER
MAX_SIG_BYTES = 128  # a DER ECDSA P-384 signature is at most 104 bytes


class KeyAuthError(FedloraError):
    """A peer's SecAgg keys are not authenticated (unsigned, badly signed, wrongly named,
    a certificate not issued by the federation CA or not valid), or this site's own signing
    material does not fit together."""


@dataclass(frozen=True)
class KeyContext:
    """What a signature is bound to besides the keys and the signer's name."""

    round_id: str
    cohort: str = ""
    round: int = 0
    kind: str = ""
    request: str = ""  # SHA-256 (hex) of what the site was asked: the same at every honest peer (secagg_site.request_digest)


@dataclass(frozen=True)
class Credentials:
    """A site's signing material (PEM / OpenSSH text; "" when absent): its name, its EC P-256
    (or P-384) private key (``<site>.key``), its certificate (``<site>.crt``) and the federation CA
    (``ca.pem``). ``signs`` when it has key and certificate; ``verifies`` when it has the CA."""

    name: str
    signing_key: str = field(default="", repr=False)
    certificate: str = ""
    ca: str = ""

    @property
    def signs(self) -> bool:
        return bool(self.signing_key and self.certificate)

    @property
    def verifies(self) -> bool:
        return bool(self.ca)


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def statement(ctx: KeyContext, site: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """The canonical byte string a site signs (module docstring); injective in its fields."""
    parts = (ctx.round_id.encode(), ctx.cohort.encode(), str(int(ctx.round)).encode(), ctx.kind.encode(), ctx.request.encode(),
             site.encode(), bytes(c_pk), bytes(s_pk))
    return DOMAIN + b"".join(_field(p) for p in parts)


def load_signing_key(text: str | bytes) -> ec.EllipticCurvePrivateKey:
    """An EC P-256 or P-384 private key from PEM (PKCS#8 / SEC1) or OpenSSH text (``fedlora certs`` writes
    ``<site>.key`` in OpenSSH format, as Flower's SuperNode reads it)."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    try:
        key = (serialization.load_ssh_private_key(data, None) if b"OPENSSH PRIVATE KEY" in data
               else serialization.load_pem_private_key(data, None))
    except (ValueError, TypeError) as e:
        raise KeyAuthError(f"the signing key is not a readable PEM or OpenSSH private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _curve_ok(key):
        raise KeyAuthError("the signing key is not an EC P-256 or P-384 key (fedlora certs makes P-256 keys)")
    return key


def load_certificate(data: str | bytes) -> x509.Certificate:
    """A certificate from PEM or DER; ``KeyAuthError`` if neither."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    try:
        return x509.load_pem_x509_certificate(raw) if raw.lstrip().startswith(b"-----BEGIN") else x509.load_der_x509_certificate(raw)
    except ValueError as e:
        raise KeyAuthError(f"not a readable X.509 certificate: {e}") from None


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def check_certificate(cert: x509.Certificate, ca: x509.Certificate, now: datetime.datetime | None = None) -> str:
    """The site name a certificate binds (its subject CN), after checking that it is a site
    certificate of this federation: signed by ``ca``'s key (issuer = the CA's subject), the CA
    and the certificate valid at ``now``, not a CA itself, extended key usage ``clientAuth``, an
    EC P-256 or P-384 key, exactly one common name. ``KeyAuthError`` naming the first rule broken."""
    now = now or _now()
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise KeyAuthError(f"its certificate ({cert.subject.rfc4514_string()}) is not issued by the federation CA "
                           f"({ca.subject.rfc4514_string()})") from None
    for what, c in (("the federation CA", ca), ("its certificate", cert)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise KeyAuthError(f"{what} is not valid now (valid {c.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                               f"{c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise KeyAuthError("its certificate is a CA certificate, not a site's")
    except x509.ExtensionNotFound:
        pass
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = x509.ExtendedKeyUsage([])
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise KeyAuthError("its certificate is not a site certificate (no clientAuth extended key usage; the coordinator's "
                           "TLS certificate, for one, is not)")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not _curve_ok(key):
        raise KeyAuthError("its certificate's key is not an EC P-256 or P-384 key")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str) or not names[0].value:
        raise KeyAuthError(f"its certificate has {len(names)} subject common names, not exactly one site name")
    return names[0].value


def sign_keys(key: ec.EllipticCurvePrivateKey, ctx: KeyContext, site: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """ECDSA (``hash_for`` the key; DER) over ``statement(ctx, site, c_pk, s_pk)``."""
    return key.sign(statement(ctx, site, c_pk, s_pk), ec.ECDSA(hash_for(key)))


def verify_keys(cert: bytes, sig: bytes, ca: x509.Certificate, ctx: KeyContext, c_pk: bytes, s_pk: bytes,
                now: datetime.datetime | None = None) -> str:
    """The signer's name, after ``check_certificate`` and the signature over the statement made
    with that name; ``KeyAuthError`` otherwise (an empty signature or certificate: unsigned)."""
    if not cert or not sig:
        raise KeyAuthError("its keys are unsigned (no signature or no certificate relayed)")
    if len(cert) > MAX_CERT_BYTES or len(sig) > MAX_SIG_BYTES:
        raise KeyAuthError(f"a certificate of {len(cert)} bytes or a signature of {len(sig)} bytes is larger than a site's")
    certificate = load_certificate(cert)
    name = check_certificate(certificate, ca, now)
    try:
        public = certificate.public_key()
        public.verify(bytes(sig), statement(ctx, name, c_pk, s_pk), ec.ECDSA(hash_for(public)))  # type: ignore[union-attr,arg-type]
    except InvalidSignature:
        raise KeyAuthError(f"the signature over its keys does not verify with the certificate of {name!r} (keys substituted, "
                           "or signed for another round, sum or site)") from None
    return name


SURVIVORS_DOMAIN = b"fedlora-secagg-survivors/v1"


def survivor_statement(ctx: KeyContext, site: str, survivors: Sequence[int], dropped: Sequence[int]) -> bytes:
    """What a site signs in the consistency check (Bonawitz et al. 2017, round 3): ``SURVIVORS_DOMAIN``,
    then as in ``statement`` the context and the signer's name, then the sorted survivors and the
    sorted dropped sites (node ids, 8-byte big-endian each, each list length-prefixed). Two views of
    who survived give two different statements."""
    def ids(xs: Sequence[int]) -> bytes:
        return b"".join(int(x).to_bytes(8, "big") for x in sorted(xs))

    parts = (ctx.round_id.encode(), ctx.cohort.encode(), str(int(ctx.round)).encode(), ctx.kind.encode(), ctx.request.encode(),
             site.encode(), ids(survivors), ids(dropped))
    return SURVIVORS_DOMAIN + b"".join(_field(p) for p in parts)


def sign_survivors(key: ec.EllipticCurvePrivateKey, ctx: KeyContext, site: str, survivors: Sequence[int],
                   dropped: Sequence[int]) -> bytes:
    """ECDSA (``hash_for`` the key; DER) over ``survivor_statement``."""
    return key.sign(survivor_statement(ctx, site, survivors, dropped), ec.ECDSA(hash_for(key)))


def survivors_signed(cert: bytes, sig: bytes, ctx: KeyContext, name: str, survivors: Sequence[int], dropped: Sequence[int]) -> bool:
    """Whether ``sig`` is the signature of the certificate's key (a certificate the verifier
    already checked at stage 2, certifying ``name``) over this view of the survivors."""
    if not cert or not sig or len(sig) > MAX_SIG_BYTES:
        return False
    try:
        public = load_certificate(cert).public_key()
        public.verify(bytes(sig), survivor_statement(ctx, name, survivors, dropped), ec.ECDSA(hash_for(public)))  # type: ignore[union-attr,arg-type]
    except (InvalidSignature, KeyAuthError, TypeError, ValueError):
        return False
    return True


HELLO_DOMAIN = b"fedlora-site-hello/v1"


def hello_statement(challenge: bytes, site: str, cohort: str) -> bytes:
    """What a site signs when it joins (``query``): ``HELLO_DOMAIN``, the coordinator's fresh
    challenge, its name and its cohort, each length-prefixed. A fresh challenge per query means
    a recorded answer cannot be replayed to join as that site."""
    return HELLO_DOMAIN + b"".join(_field(p) for p in (bytes(challenge), site.encode(), cohort.encode()))


def sign_hello(key: ec.EllipticCurvePrivateKey, challenge: bytes, site: str, cohort: str) -> bytes:
    return key.sign(hello_statement(challenge, site, cohort), ec.ECDSA(hash_for(key)))


def verify_hello(cert: bytes, sig: bytes, ca_pem: str | bytes, challenge: bytes, cohort: str,
                 now: datetime.datetime | None = None) -> str:
    """The site name the federation CA certifies for a joining site, after checking its
    certificate (``check_certificate``) and its signature over ``hello_statement`` with that
    name; ``KeyAuthError`` naming the problem otherwise (unsigned, foreign CA, bad signature)."""
    if not cert or not sig:
        raise KeyAuthError("it sent no certificate and signature with its name (an unauthenticated site)")
    if len(cert) > MAX_CERT_BYTES or len(sig) > MAX_SIG_BYTES:
        raise KeyAuthError(f"a certificate of {len(cert)} bytes or a signature of {len(sig)} bytes is larger than a site's")
    certificate = load_certificate(cert)
    name = check_certificate(certificate, load_certificate(ca_pem), now)
    try:
        public = certificate.public_key()
        public.verify(bytes(sig), hello_statement(challenge, name, cohort), ec.ECDSA(hash_for(public)))  # type: ignore[union-attr,arg-type]
    except InvalidSignature:
        raise KeyAuthError(f"its signature over the coordinator's challenge does not verify with the certificate of {name!r}") from None
    return name


@dataclass(frozen=True)
class SignedKeys:
    """One peer's relayed keys with its signature and certificate (b"" when none came)."""

    c_pk: bytes
    s_pk: bytes
    sig: bytes = b""
    cert: bytes = b""


def verify_peers(peers: Mapping[int, SignedKeys], ca_pem: str | bytes, ctx: KeyContext, own_name: str,
                 now: datetime.datetime | None = None) -> dict[int, str]:
    """Peer node id -> its certified name, once every peer's keys verify (``verify_keys``), no two
    peers share a name and none has ``own_name``; else ``KeyAuthError`` naming the peer and why."""
    ca = load_certificate(ca_pem)
    names: dict[int, str] = {}
    for peer in sorted(peers):
        k = peers[peer]
        try:
            names[peer] = verify_keys(k.cert, k.sig, ca, ctx, k.c_pk, k.s_pk, now)
        except KeyAuthError as e:
            raise KeyAuthError(f"the keys relayed for peer {peer} are refused: {e}") from None
        if names[peer] == own_name:
            raise KeyAuthError(f"the keys relayed for peer {peer} are signed by {own_name!r}, this site itself (its own keys "
                               "reflected or replayed)")
        twins = [p for p, n in names.items() if n == names[peer] and p != peer]
        if twins:
            raise KeyAuthError(f"peers {twins[0]} and {peer} both carry keys signed by {names[peer]!r}: one site cannot "
                               "stand for two peers")
    return names


def check_own(creds: Credentials, now: datetime.datetime | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """This site's key and certificate, after checking they fit: the certificate holds the key's
    public key and names this site (CN = ``creds.name``), and, when the site has the CA, it
    passes ``check_certificate`` (else its peers would refuse its keys)."""
    key = load_signing_key(creds.signing_key)
    cert = load_certificate(creds.certificate)
    if _public_der(key.public_key()) != _public_der(cert.public_key()):  # type: ignore[arg-type]
        raise KeyAuthError(f"this site's certificate does not hold the public key of its signing key (site {creds.name!r})")
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [creds.name]:
        raise KeyAuthError(f"this site's certificate names {names}, not this site {creds.name!r}")
    if creds.ca:
        try:
            check_certificate(cert, load_certificate(creds.ca), now)
        except KeyAuthError as e:
            raise KeyAuthError(f"this site's own certificate would be refused by its peers: {e}") from None
    return key, cert


def site_certificate(name: str, public_key: ec.EllipticCurvePublicKey, ca_key: ec.EllipticCurvePrivateKey,
                     ca_cert: x509.Certificate, days: int = 365, *, not_before: datetime.datetime | None = None,
                     not_after: datetime.datetime | None = None) -> x509.Certificate:
    """A site certificate as ``check_certificate`` wants it: CN = ``name``, issued and signed
    (``hash_for`` the CA's key) by the CA, not a CA, key usage digitalSignature, extended key usage clientAuth;
    valid from 5 minutes ago for ``days`` unless ``not_before`` / ``not_after`` say otherwise."""
    now = _now()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION), x509.NameAttribute(NameOID.COMMON_NAME, name)])
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject).public_key(public_key)
         .serial_number(x509.random_serial_number())
         .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
         .not_valid_after(not_after or now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                                      key_encipherment=False, data_encipherment=False, key_agreement=False,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    return b.sign(ca_key, hash_for(ca_key))


def ca_certificate(key: ec.EllipticCurvePrivateKey, days: int = 365, common_name: str = "fedlora CA") -> x509.Certificate:
    """A self-signed federation CA certificate (as ``fedlora certs`` makes one)."""
    now = _now()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hash_for(key)))


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def private_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


class InMemoryCA:
    """A federation CA held in memory, for simulation and tests: ``issue(name)`` gives a site a
    fresh P-256 key and its certificate; ``credentials(name)`` the site's whole ``Credentials``."""

    def __init__(self, days: int = 30, common_name: str = "fedlora simulation CA") -> None:
        self.key = ec.generate_private_key(CURVE())
        self.cert = ca_certificate(self.key, days, common_name)

    @property
    def pem(self) -> str:
        return pem(self.cert)

    def issue(self, name: str, **validity: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(CURVE())
        return key, site_certificate(name, key.public_key(), self.key, self.cert, **validity)

    def credentials(self, name: str) -> Credentials:
        key, cert = self.issue(name)
        return Credentials(name=name, signing_key=private_pem(key), certificate=pem(cert), ca=self.pem)
