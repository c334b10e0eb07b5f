"""The adapter wire format: named float arrays in an explicit wire dtype, with byte counts.

Pure numpy; no torch, no Flower (``fedlora.records`` puts these bytes into Flower records).

Encoding of one array ``x`` (float32 in memory):

* ``float32``: the IEEE-754 binary32 little-endian bytes of ``x`` (exact).
* ``bfloat16``: the upper 16 bits of each binary32 after round-to-nearest-even,
  ``u16 = (u32 + 0x7FFF + ((u32 >> 16) & 1)) >> 16``. Relative error <= 2^-8 for normal numbers.
* ``float16``: IEEE binary16 (relative error <= 2^-11 for |x| in [6.1e-5, 65504]).

Decoding always yields float32. Non-finite values are refused on both ends, and so are values
that overflow the wire dtype, so a NaN or Inf update never travels silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .errors import WireError

WIRE_DTYPES = ("float32", "bfloat16", "float16")
_BYTES_PER_VALUE = {"float32": 4, "bfloat16": 2, "float16": 2}
# Documented worst-case relative rounding error per wire dtype (unit roundoff).
RELATIVE_ERROR = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}


@dataclass(frozen=True)
class WireArray:
    """One encoded array: raw little-endian bytes plus what is needed to decode them."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def check_finite(name: str, x: np.ndarray) -> None:
    """Raise WireError naming the array if it holds NaN or Inf."""
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise WireError(f"array {name!r} holds {bad} non-finite value(s) (NaN/Inf); refusing to send or accept it")


def encode_array(name: str, x: np.ndarray, dtype: str) -> WireArray:
    """Encode a float array in the wire dtype (see module docstring for the exact rule)."""
    if dtype not in WIRE_DTYPES:
        raise WireError(f"unknown wire dtype {dtype!r}; known: {', '.join(WIRE_DTYPES)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_finite(name, x)
    if dtype == "float32":
        data = x.astype("<f4", copy=False).tobytes()
    elif dtype == "float16":
        if x.size and float(np.max(np.abs(x))) > float(np.finfo(np.float16).max):
            raise WireError(f"array {name!r} has values beyond float16's range (|x| > 65504); use float32 or bfloat16")
        data = x.astype("<f2").tobytes()
    else:
        u = x.view(np.uint32).astype(np.uint64)
        rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
        if np.any((rounded & 0x7F80) == 0x7F80):  # exponent all ones: rounded up to Inf
            raise WireError(f"array {name!r} has values beyond bfloat16's range (|x| > 3.39e38); use float32")
        data = rounded.tobytes()
    return WireArray(dtype=dtype, shape=tuple(int(s) for s in x.shape), data=data)


def decode_array(name: str, w: WireArray) -> np.ndarray:
    """Decode one WireArray to float32, checking its byte length and finiteness."""
    if w.dtype not in WIRE_DTYPES:
        raise WireError(f"array {name!r} has unknown wire dtype {w.dtype!r}; known: {', '.join(WIRE_DTYPES)}")
    n = int(np.prod(w.shape, dtype=np.int64)) if w.shape else 1
    expected = n * _BYTES_PER_VALUE[w.dtype]
    if len(w.data) != expected:
        raise WireError(f"array {name!r}: {len(w.data)} bytes for shape {w.shape} in {w.dtype} (expected {expected})")
    if w.dtype == "float32":
        x = np.frombuffer(w.data, dtype="<f4").astype(np.float32)
    elif w.dtype == "float16":
        x = np.frombuffer(w.data, dtype="<f2").astype(np.float32)
    else:
        x = (np.frombuffer(w.data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    x = x.reshape(w.shape)
    check_finite(name, x)
    return x


def encode_state(state: Mapping[str, np.ndarray], dtype: str) -> dict[str, WireArray]:
    """Encode every array of a state dict (keys kept in order)."""
    return {k: encode_array(k, v, dtype) for k, v in state.items()}


def decode_state(wire: Mapping[str, WireArray], expected: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Decode a wire state; with ``expected`` (name -> shape), refuse missing/extra keys and wrong shapes."""
    if expected is not None:
        missing = [k for k in expected if k not in wire]
        extra = [k for k in wire if k not in expected]
        if missing or extra:
            raise WireError(f"adapter keys do not match: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        for k, shape in expected.items():
            if tuple(wire[k].shape) != tuple(shape):
                raise WireError(f"array {k!r} has shape {tuple(wire[k].shape)}, expected {tuple(shape)}")
    return {k: decode_array(k, w) for k, w in wire.items()}


def payload_bytes(wire: Mapping[str, WireArray]) -> int:
    """Bytes that travel for a wire state: array data plus the UTF-8 key names."""
    return sum(len(w.data) + len(k.encode("utf-8")) for k, w in wire.items())
