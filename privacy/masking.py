"""Pseudo-random masks for secure aggregation from a cryptographic keystream.

``mask(seed, n, bits)`` expands a full 256-bit seed with ChaCha20 (RFC 7539 keystream of the
`cryptography` package, zero nonce: every seed is used for exactly one mask) into n values,
each the low ``bits`` bits of a little-endian 32- or 64-bit word: uniform on [0, 2^bits).
Unlike Flower's SecAgg+ (a 32-bit seed for numpy's MT19937), nothing of the seed is lost and
the generator is a stream cipher.

Masking works in the integers modulo ``2^bits``: ``add``/``sub`` wrap in the wire dtype.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_NONCE = bytes(16)  # ChaCha20 in `cryptography`: 4-byte counter + 12-byte nonce, both zero


def _word(bits: int) -> np.dtype:
    return np.dtype("<u4") if bits <= 32 else np.dtype("<u8")


def mask(seed: bytes, n: int, bits: int) -> np.ndarray:
    """n uniform values modulo 2^bits from a 32-byte seed, as uint64."""
    if len(seed) != 32:
        raise ValueError(f"a mask seed has 32 bytes, got {len(seed)}")
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in [1, 64], got {bits}")
    word = _word(bits)
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor().update(bytes(n * word.itemsize))
    values = np.frombuffer(stream, dtype=word).astype(np.uint64)
    if bits < 64:
        values &= np.uint64((1 << bits) - 1)
    return values


def add(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """(a + b) mod 2^bits, elementwise, as uint64."""
    out = np.asarray(a, dtype=np.uint64) + np.asarray(b, dtype=np.uint64)  # wraps mod 2^64
    return out & np.uint64((1 << bits) - 1) if bits < 64 else out


def sub(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """(a - b) mod 2^bits, elementwise, as uint64."""
    out = np.asarray(a, dtype=np.uint64) - np.asarray(b, dtype=np.uint64)
    return out & np.uint64((1 << bits) - 1) if bits < 64 else out
