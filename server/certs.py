"""``fedlora keygen`` and ``fedlora certs``: the key material of one federation, made with the ``cryptography`` package.

**A real federation: no private key moves** (DESIGN.md section 7: the CA key stays offline with the
operator, a site's key never leaves its machine).

1. Each site runs ``fedlora keygen --site NAME --out DIR`` on its own machine (``keygen``):
   ``NAME.key`` (EC P-256, OpenSSH format, mode 0600, folder 0700; never overwritten),
   ``NAME.pub`` (its OpenSSH public key: the coordinator's SuperNode allowlist entry) and
   ``NAME.csr`` (a PKCS#10 request, subject CN = NAME, signed by the key). It sends the ``.pub``
   and the ``.csr`` to the operator, never the ``.key``.
2. The operator runs ``fedlora certs --out DIR --hosts ... --sign-requests NAME.csr ...``
   (``sign_requests``): every request's signature, key and name are checked, and the files go to
   one folder per machine:

       DIR/operator/       ca.key, ca.pem              the CA: ca.key stays offline, never on the coordinator
       DIR/coordinator/    ca.pem, server.pem, server.key, <site>.pub for every site
                                                       exactly what ``fedlora server --certs`` reads
       DIR/sites/<site>/   ca.pem, <site>.crt          sent back to that site (beside its <site>.key)

   ``<site>.crt`` has the profile of the one-shot mode's site certificates; the ``.pub`` copied
   into the allowlist is checked to hold the request's key (written from the request when no
   ``.pub`` is found beside it or given).

**For tests and demos** (``make_certs``, ``fedlora certs --out DIR --sites a,b,c``): everything in
one folder, the sites' private keys made here, centrally. Files written into ``DIR``:

    ca.pem, ca.key            the federation's CA (EC P-256, self-signed); ca.key stays with the operator
    server.pem, server.key    the coordinator's TLS certificate (signed by the CA; its subject
                              alternative names are the --hosts given: DNS names and IP addresses)
    <site>.key, <site>.pub    one key pair per site for SuperNode authentication (EC P-256,
                              OpenSSH format, as Flower's SuperNode and ``flwr supernode register`` read them)
    <site>.crt                the site's certificate (PEM, signed by the CA): subject CN = the site's
                              name, the public key of <site>.key, extended key usage clientAuth. The
                              site signs its secure-aggregation keys with <site>.key and its peers
                              check them against ca.pem (``fedlora.privacy.key_signing``), so the
                              coordinator, which never holds ca.key, cannot substitute them
    WHERE-FILES-GO.txt        which file goes to which machine

Private keys are created with mode 0600 (never readable by others, not even briefly) and the
folder with 0700. Existing files are never overwritten: a second call with new site names adds
their key pairs and reuses the CA and server certificate already there; a site key made before
certificates existed (a ``<site>.key`` without ``<site>.crt``) gets its certificate, for the
key it already has.

Private keys are refused at use when their group or others can read them (``fedlora.keyfiles``):
``ca.key`` when ``fedlora certs`` reads it back, ``server.key`` in ``check_server_certs``, a
site's key in ``fedlora.keyfiles.check_site_key``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.errors import ConfigError
from fedlora.files import write_text_atomic
from fedlora.keyfiles import check_private_key_file
from fedlora.privacy import key_signing
from fedlora.privacy.key_signing import site_certificate

LOOPBACK = ("localhost", "127.0.0.1")
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CURVE = key_signing.CURVE  # P-256 for new keys
ACCEPTED_CURVES = key_signing.ACCEPTED_CURVES  # folders made with P-384 keys stay usable


@dataclass(frozen=True)
class CertsResult:
    out: Path
    created: list[str]
    kept: list[str]
    guide: str


def _write(path: Path, data: bytes, private: bool) -> None:
    """Create ``path`` exclusively (never overwrite) with mode 0600 for private material."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, signer: ec.EllipticCurvePrivateKey,
                 days: int, *, ca: bool, hosts: Sequence[str] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora federation"), x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
    else:
        b = (b.add_extension(_san(hosts), critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return b.sign(signer, key_signing.hash_for(signer))


DEMO_LABEL = "for tests and demos: makes the sites' private keys here"


def guide(out: Path, sites: Sequence[str]) -> str:
    """What the operator does with each file of the one-shot (tests and demos) folder."""
    lines = [f"fedlora certs in {out} ({DEMO_LABEL}; for a real federation each site runs fedlora keygen and the",
             "operator signs its request: fedlora certs --out DIR --sign-requests SITE.csr ...):",
             "  coordinator (fedlora server --certs DIR):  ca.pem, server.pem, server.key, and every <site>.pub (the allowlist)",
             "  each site (fedlora client):                ca.pem (--root-cert), its own <site>.key (--key) and <site>.crt (beside",
             "                                             the key, or --cert); nothing else",
             "  keep offline, with the operator:           ca.key (signs new server and site certificates; never on the coordinator)",
             "  never copy a .key file anywhere but its own machine."]
    for s in sites:
        lines.append(f"  site {s}: send ca.pem, {s}.key and {s}.crt to {s}; {s}.pub stays on the coordinator")
    return "\n".join(lines) + "\n"


def site_name_problem(name: str) -> str:
    """Why ``name`` cannot name a site ("" when it can): letters, digits, '-', '_', '.' (at
    most 64, starting with a letter or digit), not 'ca' or 'server' (the names of the CA's and
    the coordinator's files)."""
    if not SITE_NAME.match(name) or name in ("ca", "server"):
        return "a site name is letters, digits, '-', '_', '.' (at most 64), not 'ca' or 'server'"
    return ""


def _hosts(hosts: Sequence[str]) -> list[str]:
    out = [h.strip() for h in hosts if h.strip()]
    if not out:
        raise ConfigError("--hosts", "", "name at least one host name or IP address the coordinator is reached at")
    return out + [h for h in LOOPBACK if h not in out]  # the coordinator reaches its own SuperLink over loopback


def _check_days(days: int) -> None:
    if not 1 <= days <= 3650:
        raise ConfigError("--days", days, "must be between 1 and 3650")


def _ssh_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A site key as Flower's SuperNode reads it (OpenSSH, unencrypted)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())


def _ssh_public(key: ec.EllipticCurvePublicKey, site: str) -> bytes:
    """A site's allowlist entry (as ``flwr supernode register`` reads it): its OpenSSH public key, its name as comment."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" fedlora-site:{site}\n".encode()


def _public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_ca(key_path: Path, cert_path: Path, flag: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA's key (refused when its group or others can read it) and certificate, checked to belong together."""
    check_private_key_file(key_path, "the CA's private key")
    try:
        ca_key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as e:
        raise ConfigError(flag, str(key_path.parent), f"holds an unreadable ca.key or ca.pem: {e}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(flag, str(key_path), "is not an EC private key made by fedlora certs")
    if _public_der(ca_key.public_key()) != _public_der(ca_cert.public_key()):  # type: ignore[arg-type]
        raise ConfigError(flag, str(key_path), "does not belong to ca.pem beside it")
    return ca_key, ca_cert


def make_certs(out: str | Path, hosts: Sequence[str], sites: Sequence[str], *, days: int = 365) -> CertsResult:
    """Create (or complete) a one-shot certificate folder, for tests and demos: the sites' private
    keys are made here (see the module docstring; a real federation uses ``keygen`` at each site
    and ``sign_requests``)."""
    root = Path(out)
    hosts = _hosts(hosts)
    sites = [s.strip() for s in sites if s.strip()]
    for s in sites:
        if site_name_problem(s):
            raise ConfigError("--sites", s, site_name_problem(s))
    if len(set(sites)) != len(sites):
        raise ConfigError("--sites", ",".join(sites), "names a site twice")
    _check_days(days)
    if (root / "operator").exists() or (root / "coordinator").exists():
        raise ConfigError("--out", str(root), "holds the operator/coordinator/sites folders of fedlora certs --sign-requests; "
                                              "add sites there with --sign-requests, or use a new folder for --sites")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    created: list[str] = []
    kept: list[str] = []
    if (root / "ca.pem").exists() != (root / "ca.key").exists():
        raise ConfigError("--out", str(root), "holds only one of ca.pem and ca.key; restore the other or use a new folder")
    if (root / "ca.key").exists():
        ca_key, ca_cert = _load_ca(root / "ca.key", root / "ca.pem", "--out")
        kept += ["ca.pem", "ca.key"]
    else:
        ca_key = ec.generate_private_key(CURVE())
        ca_cert = _certificate("fedlora CA", ca_key, None, ca_key, days, ca=True)
        _write(root / "ca.key", _private_pem(ca_key), private=True)
        _write(root / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
        created += ["ca.pem", "ca.key"]
    created += _server_files(root, hosts, ca_key, ca_cert, days, kept)
    for s in sites:
        if (root / f"{s}.key").exists() or (root / f"{s}.pub").exists():
            kept += [f"{s}.key", f"{s}.pub"]
            continue
        key = ec.generate_private_key(CURVE())
        _write(root / f"{s}.key", _ssh_private(key), private=True)
        _write(root / f"{s}.pub", _ssh_public(key.public_key(), s), private=False)
        created += [f"{s}.key", f"{s}.pub"]
    for s in dict.fromkeys(sites + sorted(p.stem for p in root.glob("*.key") if p.stem not in ("ca", "server"))):
        if (root / f"{s}.crt").exists():
            kept.append(f"{s}.crt")
        elif (root / f"{s}.key").exists():
            cert = site_certificate(s, _site_key(root / f"{s}.key").public_key(), ca_key, ca_cert, days)
            _write(root / f"{s}.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)
            created.append(f"{s}.crt")
    all_sites = sorted(p.stem for p in root.glob("*.pub"))
    text = guide(root, all_sites)
    (root / "WHERE-FILES-GO.txt").write_text(text, encoding="utf-8")
    return CertsResult(root, created, kept, text)


def _server_files(folder: Path, hosts: Sequence[str], ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, days: int,
                  kept: list[str]) -> list[str]:
    """server.pem and server.key in ``folder``, made unless one of them is there (then listed in ``kept``)."""
    if (folder / "server.pem").exists() or (folder / "server.key").exists():
        kept += [n for n in ("server.pem", "server.key") if (folder / n).exists()]
        return []
    key = ec.generate_private_key(CURVE())
    cert = _certificate(hosts[0], key, ca_cert.subject, ca_key, days, ca=False, hosts=hosts)
    _write(folder / "server.key", _private_pem(key), private=True)
    _write(folder / "server.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)
    return ["server.pem", "server.key"]


def _site_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A site's existing OpenSSH private key (refused when its group or others can read it)."""
    check_private_key_file(path, "the site's private key")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except ValueError as e:
        raise ConfigError("--out", str(path), f"is not a readable OpenSSH private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ACCEPTED_CURVES):
        raise ConfigError("--out", str(path), "is not an EC P-256 or P-384 key made by fedlora certs")
    return key


# ---- keys born at the sites: fedlora keygen (at a site), fedlora certs --sign-requests (the operator) ----

OPERATOR, COORDINATOR, SITES = "operator", "coordinator", "sites"


@dataclass(frozen=True)
class KeygenResult:
    out: Path
    site: str
    created: list[str]
    kept: list[str]
    guide: str


def site_request(key: ec.EllipticCurvePrivateKey, site: str) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for a site certificate: subject O = fedlora federation, CN = ``site``,
    the key's public key, signed (SHA-384) by the key. It asks for nothing else: the operator
    issues the site profile whatever a request says (``sign_requests``)."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora federation"), x509.NameAttribute(NameOID.COMMON_NAME, site)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, key_signing.hash_for(key))


def keygen_guide(out: Path, site: str) -> str:
    """What a site does with the files ``keygen`` wrote."""
    return (f"fedlora keygen in {out}:\n"
            f"  send to the federation's operator:  {out / (site + '.pub')} and {out / (site + '.csr')} (public: no secret in them)\n"
            f"  keep here, never copy anywhere:     {out / (site + '.key')} (this site's private key, mode 0600)\n"
            f"  the operator sends back ca.pem and {site}.crt: put {site}.crt beside {site}.key, then\n"
            f"  fedlora client --key {out / (site + '.key')} --root-cert ca.pem ...\n")


def keygen(site: str, out: str | Path) -> KeygenResult:
    """At a site: ``<site>.key`` (EC P-256, OpenSSH format as Flower's SuperNode reads it, mode
    0600), ``<site>.pub`` (its allowlist entry) and ``<site>.csr`` (``site_request``) in ``out``
    (made with mode 0700). Nothing is overwritten: with the key already there, a missing ``.pub``
    or ``.csr`` is made from it and the ones there are checked to belong to it; a ``.pub`` or
    ``.csr`` without its key is refused (they would name a key that no longer exists)."""
    site = site.strip()
    if site_name_problem(site):
        raise ConfigError("--site", site, site_name_problem(site))
    root = Path(out)
    paths = {ext: root / f"{site}.{ext}" for ext in ("key", "pub", "csr")}
    if not paths["key"].exists() and (paths["pub"].exists() or paths["csr"].exists()):
        stale = [str(p) for e, p in paths.items() if e != "key" and p.exists()]
        raise ConfigError("--out", str(root), f"holds {', '.join(stale)} but not {paths['key']}: they belong to a key that is gone; "
                                              "remove them (and tell the operator) before making a new key")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    created: list[str] = []
    kept: list[str] = []
    if paths["key"].exists():
        key = _site_key(paths["key"])
        kept.append(paths["key"].name)
    else:
        key = ec.generate_private_key(CURVE())
        _write(paths["key"], _ssh_private(key), private=True)
        created.append(paths["key"].name)
    public = _public_der(key.public_key())
    if paths["pub"].exists():
        if _public_der(_read_pub(paths["pub"], "--out")) != public:
            raise ConfigError("--out", str(paths["pub"]), f"is not the public key of {paths['key'].name}")
        kept.append(paths["pub"].name)
    else:
        _write(paths["pub"], _ssh_public(key.public_key(), site), private=False)
        created.append(paths["pub"].name)
    if paths["csr"].exists():
        name, csr_key = _read_request(paths["csr"], "--out")
        if name != site or _public_der(csr_key) != public:
            raise ConfigError("--out", str(paths["csr"]), f"is not a request of site {site!r} for {paths['key'].name}")
        kept.append(paths["csr"].name)
    else:
        _write(paths["csr"], site_request(key, site).public_bytes(serialization.Encoding.PEM), private=False)
        created.append(paths["csr"].name)
    return KeygenResult(root, site, created, kept, keygen_guide(root, site))


def _read_pub(path: Path, flag: str) -> ec.EllipticCurvePublicKey:
    """A site's OpenSSH public key file (``<site>.pub``): EC P-256."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes().strip().split(b"\n")[0])
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(flag, str(path), f"is not a readable OpenSSH public key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ACCEPTED_CURVES):
        raise ConfigError(flag, str(path), "is not an EC P-256 or P-384 public key (fedlora keygen makes P-256 keys)")
    return key


def _read_request(path: Path, flag: str) -> tuple[str, ec.EllipticCurvePublicKey]:
    """(site name, public key) of a site's certificate request, after checking that it parses
    (PEM or DER), that its signature verifies with the key it carries (a request altered after
    signing, in its name or its key, is refused), that the key is EC P-256 and that its subject
    has exactly one common name, a valid site name."""
    try:
        raw = path.read_bytes()
        csr = (x509.load_pem_x509_csr(raw) if raw.lstrip().startswith(b"-----BEGIN") else x509.load_der_x509_csr(raw))
    except (OSError, ValueError) as e:
        raise ConfigError(flag, str(path), f"is not a readable certificate request (PKCS#10, from fedlora keygen): {e}") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, InvalidSignature):
        valid = False
    if not valid:
        raise ConfigError(flag, str(path), "its signature does not verify with the public key it carries (altered or forged "
                                           "after signing): refused, no certificate issued")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ACCEPTED_CURVES):
        raise ConfigError(flag, str(path), "requests a certificate for a key that is not EC P-256 or P-384 (fedlora keygen makes P-256 keys)")
    names = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(names) != 1 or not isinstance(names[0], str):
        raise ConfigError(flag, str(path), f"has {len(names)} subject common names, not exactly one site name")
    if site_name_problem(names[0]):
        raise ConfigError(flag, str(path), f"requests the name {names[0]!r}: {site_name_problem(names[0])}")
    return names[0], key


def coordinator_dir(certs: str | Path) -> Path:
    """The folder ``fedlora server --certs DIR`` reads: ``DIR/coordinator`` when it exists (the
    layout of ``fedlora certs --sign-requests``), else ``DIR`` itself (the one-shot layout, or a
    coordinator folder copied to the coordinator's machine). ``ca.key`` is never needed there."""
    root = Path(certs)
    return root / COORDINATOR if (root / COORDINATOR).is_dir() else root


def split_guide(out: Path, sites: Sequence[str]) -> str:
    """What the operator does with each folder of the ``--sign-requests`` layout."""
    lines = [f"fedlora certs in {out}: no site's private key is here (each site made its own with fedlora keygen)",
             f"  {OPERATOR}/      ca.key, ca.pem: keep offline, with the operator (ca.key signs new server and site",
             "                 certificates; never on the coordinator)",
             f"  {COORDINATOR}/   copy to the coordinator: fedlora server --certs {out / COORDINATOR} (ca.pem, server.pem,",
             "                 server.key, every <site>.pub: the allowlist)",
             f"  {SITES}/<site>/  send to that site: ca.pem (--root-cert) and <site>.crt (beside its <site>.key, or --cert)"]
    for s in sites:
        lines.append(f"  site {s}: send {out / SITES / s / 'ca.pem'} and {out / SITES / s / (s + '.crt')} to {s}")
    return "\n".join(lines) + "\n"


def _same_file(path: Path, data: bytes, what: str) -> bool:
    """True when ``path`` holds ``data``; False when missing; ConfigError when it holds something else."""
    if not path.exists():
        return False
    if path.read_bytes() != data:
        raise ConfigError("--out", str(path), f"is not {what}; restore it or use a new folder")
    return True


def sign_requests(out: str | Path, hosts: Sequence[str], requests: Sequence[str | Path], *, days: int = 365) -> CertsResult:
    """The operator's side of keys born at the sites (module docstring): check every request
    (``_read_request``) and the ``.pub`` that goes with it (one given among ``requests`` holding the
    request's key, else ``<request>.pub`` beside it, else written from the request's key; either
    way it must hold the request's key), then issue ``sites/<site>/<site>.crt`` and copy
    ``<site>.pub`` into ``coordinator/``. Everything is checked before anything is written: two
    requests for one name, one key under two names, or a site already registered with another
    key are refused. The CA (``operator/``) and the coordinator's TLS files are made on the first
    call and reused after; a site already registered with the same key is kept."""
    root = Path(out)
    hosts = _hosts(hosts)
    _check_days(days)
    if (root / "ca.key").exists() or (root / "server.key").exists():
        raise ConfigError("--out", str(root), f"holds the one-shot layout of fedlora certs --sites ({DEMO_LABEL}); "
                                              "sign requests into a new folder")
    csrs = [Path(r) for r in requests if Path(r).suffix != ".pub"]
    pubs = {_public_der(_read_pub(Path(r), "--sign-requests")): Path(r) for r in requests if Path(r).suffix == ".pub"}
    if not csrs:
        raise ConfigError("--sign-requests", [str(r) for r in requests], "names no certificate request (.csr from fedlora keygen)")
    coord, op = root / COORDINATOR, root / OPERATOR
    registered = {_public_der(_read_pub(p, "--out")): name for name, p in site_public_keys(coord).items()} if coord.is_dir() else {}
    plan: dict[str, tuple[ec.EllipticCurvePublicKey, bytes, Path]] = {}  # site -> (key, allowlist entry, request)
    for csr in csrs:
        name, key = _read_request(csr, "--sign-requests")
        der = _public_der(key)
        beside = csr.with_suffix(".pub")
        pub = pubs.get(der) or (beside if beside.is_file() else None)
        if pub is not None and _public_der(_read_pub(pub, "--sign-requests")) != der:
            raise ConfigError("--sign-requests", str(pub), f"does not hold the key that {csr} requests a certificate for")
        entry = pub.read_bytes() if pub is not None else _ssh_public(key, name)
        if name in plan:
            raise ConfigError("--sign-requests", str(csr), f"requests the name {name!r}, as {plan[name][2]} does")
        twin = next((s for s, (k, _, _) in plan.items() if _public_der(k) == der), None) or registered.get(der)
        if twin is not None and twin != name:
            raise ConfigError("--sign-requests", str(csr), f"requests {name!r} for the key of site {twin!r}: one key cannot "
                                                           "stand for two sites")
        if (coord / f"{name}.pub").exists() and _public_der(_read_pub(coord / f"{name}.pub", "--out")) != der:
            raise ConfigError("--sign-requests", str(csr), f"requests {name!r}, registered with another key in "
                                                           f"{coord / (name + '.pub')}; to replace that site's key remove it "
                                                           f"and {root / SITES / name} first")
        crt = root / SITES / name / f"{name}.crt"
        if crt.exists() and _public_der(x509.load_pem_x509_certificate(crt.read_bytes()).public_key()) != der:  # type: ignore[arg-type]
            raise ConfigError("--sign-requests", str(csr), f"requests {name!r}, but {crt} certifies another key; remove "
                                                           f"{root / SITES / name} (the old key's files) first")
        plan[name] = (key, entry, csr)

    if (op / "ca.pem").exists() != (op / "ca.key").exists():
        raise ConfigError("--out", str(op), "holds only one of ca.pem and ca.key; restore the other or use a new folder")
    for d in (root, op, coord, root / SITES):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
    created: list[str] = []
    kept: list[str] = []
    if (op / "ca.key").exists():
        ca_key, ca_cert = _load_ca(op / "ca.key", op / "ca.pem", "--out")
        kept += [f"{OPERATOR}/ca.pem", f"{OPERATOR}/ca.key"]
    else:
        ca_key = ec.generate_private_key(CURVE())
        ca_cert = _certificate("fedlora CA", ca_key, None, ca_key, days, ca=True)
        _write(op / "ca.key", _private_pem(ca_key), private=True)
        _write(op / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
        created += [f"{OPERATOR}/ca.pem", f"{OPERATOR}/ca.key"]
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    if _same_file(coord / "ca.pem", ca_pem, f"the CA certificate of {op / 'ca.pem'}"):
        kept.append(f"{COORDINATOR}/ca.pem")
    else:
        _write(coord / "ca.pem", ca_pem, private=False)
        created.append(f"{COORDINATOR}/ca.pem")
    server_kept: list[str] = []
    created += [f"{COORDINATOR}/{n}" for n in _server_files(coord, hosts, ca_key, ca_cert, days, server_kept)]
    kept += [f"{COORDINATOR}/{n}" for n in server_kept]
    for name, (key, entry, _) in plan.items():
        site_dir = root / SITES / name
        site_dir.mkdir(exist_ok=True)
        os.chmod(site_dir, 0o700)
        if (coord / f"{name}.pub").exists():
            kept.append(f"{COORDINATOR}/{name}.pub")
        else:
            _write(coord / f"{name}.pub", entry, private=False)
            created.append(f"{COORDINATOR}/{name}.pub")
        if _same_file(site_dir / "ca.pem", ca_pem, f"the CA certificate of {op / 'ca.pem'}"):
            kept.append(f"{SITES}/{name}/ca.pem")
        else:
            _write(site_dir / "ca.pem", ca_pem, private=False)
            created.append(f"{SITES}/{name}/ca.pem")
        crt = site_dir / f"{name}.crt"
        if crt.exists():  # of this key: checked above
            kept.append(f"{SITES}/{name}/{name}.crt")
        else:
            _write(crt, site_certificate(name, key, ca_key, ca_cert, days).public_bytes(serialization.Encoding.PEM), private=False)
            created.append(f"{SITES}/{name}/{name}.crt")
    text = split_guide(root, sorted(site_public_keys(coord)))
    write_text_atomic(root / "WHERE-FILES-GO.txt", text)
    return CertsResult(root, created, kept, text)


def site_public_keys(certs: Path) -> dict[str, Path]:
    """The allowlist: site name -> its public key file (every ``<site>.pub`` in the folder)."""
    return {p.stem: p for p in sorted(certs.glob("*.pub"))}


def check_server_certs(certs: Path) -> dict[str, Path]:
    """The coordinator's TLS files, checked: present, parseable, the key matching the
    certificate, the certificate signed by ``ca.pem`` and valid now."""
    files = {n: certs / f for n, f in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"))}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ConfigError("--certs", str(certs), f"lacks {', '.join(missing)} (make them with fedlora certs)")
    check_private_key_file(files["key"], "the coordinator's TLS key")
    try:
        ca = x509.load_pem_x509_certificate(files["ca"].read_bytes())
        cert = x509.load_pem_x509_certificate(files["cert"].read_bytes())
        key = serialization.load_pem_private_key(files["key"].read_bytes(), None)
    except ValueError as e:
        raise ConfigError("--certs", str(certs), f"holds an unreadable certificate or key: {e}") from None
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError("--certs", str(files["key"]), "does not belong to server.pem")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError("--certs", str(files["cert"]), "is not signed by ca.pem") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ConfigError("--certs", str(files["cert"]), f"is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})")
    return files
