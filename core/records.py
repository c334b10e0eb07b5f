"""Flower glue for the wire format: wire states to and from ``ArrayRecord``.

Arrays use ``stype = "fedlora.raw"``: ``data`` holds exactly the encoded values of
:mod:`fedlora.wire` (no numpy header), so the bytes counted are the bytes sent.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from .errors import WireError
from .wire import WireArray, decode_state, encode_state, payload_bytes

STYPE = "fedlora.raw"


def to_record(state: Mapping[str, np.ndarray], dtype: str) -> tuple[ArrayRecord, int]:
    """Encode a float state in the wire dtype; returns the record and its payload bytes."""
    wire = encode_state(state, dtype)
    record = ArrayRecord({k: Array(dtype=w.dtype, shape=tuple(w.shape), stype=STYPE, data=w.data) for k, w in wire.items()})
    return record, payload_bytes(wire)


def from_record(record: ArrayRecord, expected: Mapping[str, tuple[int, ...]] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Decode an ArrayRecord written by ``to_record``; returns the float32 state and its payload bytes."""
    wire: dict[str, WireArray] = {}
    for k, a in record.items():
        if a.stype != STYPE:
            raise WireError(f"array {k!r} has serialisation {a.stype!r}, expected {STYPE!r}")
        wire[k] = WireArray(dtype=a.dtype, shape=tuple(a.shape), data=a.data)
    return decode_state(wire, expected), payload_bytes(wire)
