"""``fedlora certs``: the key material of one federation, made with the ``cryptography`` package.

Files written into ``DIR``:

    ca.pem, ca.key            the federation's CA (EC P-384, self-signed); ca.key stays with the operator
    server.pem, server.key    the coordinator's TLS certificate (signed by the CA; its subject
                              alternative names are the --hosts given: DNS names and IP addresses)
    <site>.key, <site>.pub    one key pair per site for SuperNode authentication (EC P-384,
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
from fedlora.privacy.key_signing import site_certificate

LOOPBACK = ("localhost", "127.0.0.1")
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CURVE = ec.SECP384R1


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
    return b.sign(signer, hashes.SHA384())


def guide(out: Path, sites: Sequence[str]) -> str:
    """What the operator does with each file."""
    lines = [f"fedlora certs in {out}:",
             "  coordinator (fedlora server --certs DIR):  ca.pem, server.pem, server.key, and every <site>.pub (the allowlist)",
             "  each site (fedlora client):                ca.pem (--root-cert), its own <site>.key (--key) and <site>.crt (beside",
             "                                             the key, or --cert); nothing else",
             "  keep offline, with the operator:           ca.key (signs new server and site certificates; never on the coordinator)",
             "  never copy a .key file anywhere but its own machine."]
    for s in sites:
        lines.append(f"  site {s}: send ca.pem, {s}.key and {s}.crt to {s}; {s}.pub stays on the coordinator")
    return "\n".join(lines) + "\n"


def make_certs(out: str | Path, hosts: Sequence[str], sites: Sequence[str], *, days: int = 365) -> CertsResult:
    """Create (or complete) a federation's certificate folder; see the module docstring."""
    root = Path(out)
    hosts = [h.strip() for h in hosts if h.strip()]
    hosts += [h for h in LOOPBACK if h not in hosts]  # the coordinator reaches its own SuperLink over loopback
    sites = [s.strip() for s in sites if s.strip()]
    if not hosts:
        raise ConfigError("--hosts", "", "name at least one host name or IP address the coordinator is reached at")
    for s in sites:
        if not SITE_NAME.match(s) or s in ("ca", "server"):
            raise ConfigError("--sites", s, "a site name is letters, digits, '-', '_', '.' (at most 64), not 'ca' or 'server'")
    if len(set(sites)) != len(sites):
        raise ConfigError("--sites", ",".join(sites), "names a site twice")
    if not 1 <= days <= 3650:
        raise ConfigError("--days", days, "must be between 1 and 3650")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    created: list[str] = []
    kept: list[str] = []
    if (root / "ca.pem").exists() != (root / "ca.key").exists():
        raise ConfigError("--out", str(root), "holds only one of ca.pem and ca.key; restore the other or use a new folder")
    if (root / "ca.key").exists():
        ca_key = serialization.load_pem_private_key((root / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((root / "ca.pem").read_bytes())
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ConfigError("--out", str(root / "ca.key"), "is not an EC private key made by fedlora certs")
        kept += ["ca.pem", "ca.key"]
    else:
        ca_key = ec.generate_private_key(CURVE())
        ca_cert = _certificate("fedlora CA", ca_key, None, ca_key, days, ca=True)
        _write(root / "ca.key", _private_pem(ca_key), private=True)
        _write(root / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
        created += ["ca.pem", "ca.key"]
    if (root / "server.pem").exists() or (root / "server.key").exists():
        kept += [n for n in ("server.pem", "server.key") if (root / n).exists()]
    else:
        key = ec.generate_private_key(CURVE())
        cert = _certificate(hosts[0], key, ca_cert.subject, ca_key, days, ca=False, hosts=hosts)
        _write(root / "server.key", _private_pem(key), private=True)
        _write(root / "server.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)
        created += ["server.pem", "server.key"]
    for s in sites:
        if (root / f"{s}.key").exists() or (root / f"{s}.pub").exists():
            kept += [f"{s}.key", f"{s}.pub"]
            continue
        key = ec.generate_private_key(CURVE())
        _write(root / f"{s}.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                    serialization.NoEncryption()), private=True)
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(root / f"{s}.pub", pub + f" fedlora-site:{s}\n".encode(), private=False)
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


def _site_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A site's existing OpenSSH private key, to issue its certificate for."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except ValueError as e:
        raise ConfigError("--out", str(path), f"is not a readable OpenSSH private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, CURVE):
        raise ConfigError("--out", str(path), "is not an EC P-384 key made by fedlora certs")
    return key


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


def check_site_key(path: Path) -> None:
    """A site's private key as Flower's SuperNode reads it (OpenSSH, elliptic curve)."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (OSError, ValueError) as e:
        raise ConfigError("--key", str(path), f"is not a readable OpenSSH private key (made by fedlora certs): {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("--key", str(path), "must be an elliptic-curve key (fedlora certs makes P-384 keys)")


def check_root_cert(path: Path) -> None:
    try:
        x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError("--root-cert", str(path), f"is not a readable PEM certificate: {e}") from None
