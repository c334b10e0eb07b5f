"""Private key files: refused at use when anyone but their owner can read them; a site's key and
the federation's root certificate checked before a SuperNode starts (``check_site_key``,
``check_root_cert``: shared by ``fedlora client`` and the coordinator's tools).

``fedlora keygen`` and ``fedlora certs`` create every private key with mode 0600; a key that
has since become readable by its group or by others (copied with ``cp`` under a loose umask,
unpacked from an archive, checked out of a repository) may already have been read by someone
else, and fedlora refuses to use it rather than warn. One check, used wherever a private key is
read: a site's ``--key`` (``fedlora client``), the coordinator's ``server.key`` (``fedlora
server --certs``), the CA's ``ca.key`` and the site keys ``fedlora certs`` and ``fedlora
keygen`` read back.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import ConfigError, DeploymentError


def check_private_key_file(path: str | Path, what: str = "private key") -> Path:
    """``path`` if it is a regular file that only its owner can read or write (mode & 0o077 == 0);
    ``DeploymentError`` naming the file, its mode and the ``chmod 600`` that fixes it otherwise,
    or naming the file when it is missing. A symlink is judged by the file it points to. On
    systems without POSIX modes (Windows) only the file's existence is checked."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise DeploymentError(f"{what} {p} cannot be read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DeploymentError(f"{what} {p} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if os.name == "posix" and mode & 0o077:
        raise DeploymentError(f"{what} {p} has mode {mode:04o}: readable or writable by its group or by others, so it may "
                              f"no longer be secret; refusing to use it. If only you could have read it, restrict it with: "
                              f"chmod 600 {p}")
    return p


def check_site_key(path: Path) -> None:
    """A site's private key as Flower's SuperNode reads it (OpenSSH, elliptic curve), refused
    (``DeploymentError``) when its group or others can read it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError("--key", str(path), f"is not a readable OpenSSH private key (made by fedlora keygen): {e}") from None
    check_private_key_file(path, "this site's private key (--key)")
    try:
        key = serialization.load_ssh_private_key(data, None)
    except ValueError as e:
        raise ConfigError("--key", str(path), f"is not a readable OpenSSH private key (made by fedlora keygen): {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("--key", str(path), "must be an elliptic-curve key (fedlora certs makes P-256 keys)")


def check_root_cert(path: Path) -> None:
    try:
        x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError("--root-cert", str(path), f"is not a readable PEM certificate: {e}") from None
