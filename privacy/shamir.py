"""Shamir secret sharing of 32-byte secrets (pure Python integers).

A secret ``s`` (interpreted as an integer below ``PRIME = 2^521 - 1``) is hidden in the constant
term of a random polynomial ``f`` of degree ``t - 1`` over GF(PRIME); share i is ``(i, f(i))``
for i = 1..n. Any t shares determine ``f(0) = s`` by Lagrange interpolation; fewer than t reveal
nothing about s (every s is equally consistent with them). Coefficients come from ``secrets``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

PRIME = 2**521 - 1  # a Mersenne prime: larger than any 256-bit secret
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: bytes, threshold: int, shares: int) -> list[tuple[int, bytes]]:
    """``shares`` shares of ``secret``, any ``threshold`` of which reconstruct it."""
    if not 1 <= threshold <= shares:
        raise ValueError(f"need 1 <= threshold <= shares, got threshold {threshold}, shares {shares}")
    if len(secret) > 64:
        raise ValueError(f"secrets of at most 64 bytes, got {len(secret)}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = []
    for x in range(1, shares + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out.append((x, y.to_bytes(SHARE_BYTES, "big")))
    return out


def combine(shares: Sequence[tuple[int, bytes]], threshold: int, length: int = 32) -> bytes:
    """The secret from at least ``threshold`` distinct shares (Lagrange interpolation at 0)."""
    points = {x: int.from_bytes(y, "big") for x, y in shares}
    if len(points) < threshold:
        raise ValueError(f"need {threshold} distinct shares, got {len(points)}")
    xs = sorted(points)[:threshold]
    secret = 0
    for i in xs:
        num, den = 1, 1
        for j in xs:
            if j != i:
                num = num * (-j) % PRIME
                den = den * (i - j) % PRIME
        secret = (secret + points[i] * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 256**length:
        raise ValueError("the shares do not reconstruct a secret of the expected length (corrupted or mixed shares)")
    return secret.to_bytes(length, "big")
