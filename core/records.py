"""Flower glue for the wire format: wire states to and from ``ArrayRecord``.

Arrays use ``stype = "fedlora.raw"``: ``data`` holds exactly the encoded values of
:mod:`fedlora.wire` (no numpy header), so the bytes counted are the bytes sent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from .errors import WireError
from .wire import WireArray, decode_state, encode_state, payload_bytes

STYPE = "fedlora.raw"


def to_record(state: Mapping[str, np.ndarray], dtype: str) -> tuple[ArrayRecord, int]:
    """Encode a float state in the wire dtype; returns the record and its payload bytes."""
    wire = encode_state(state, dtype)
    record = ArrayRecord({k: Array(dtype=w.dtype, shape=tuple(w.shape), stype=STYPE, data=w.data) for k, w in wire.items()})
    return record, payload_bytes(wire)


def adapter_digest(record: ArrayRecord) -> str:
    """SHA-256 (hex) of an adapter record as it travels: every array's name, dtype, shape,
    serialisation and bytes, in name order. Two records with the same digest decode to the same
    adapter (``protocol.AdapterRef``)."""
    h = hashlib.sha256(b"fedlora-adapter/v1\0")
    for key in sorted(record.keys()):
        a = record[key]
        h.update(json.dumps([key, a.dtype, list(a.shape), a.stype, len(a.data)]).encode() + b"\0")
        h.update(a.data)
    return h.hexdigest()


def from_record(record: ArrayRecord, expected: Mapping[str, tuple[int, ...]] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Decode an ArrayRecord written by ``to_record``; returns the float32 state and its payload bytes."""
    wire: dict[str, WireArray] = {}
    for k, a in record.items():
        if a.stype != STYPE:
            raise WireError(f"array {k!r} has serialisation {a.stype!r}, expected {STYPE!r}")
        wire[k] = WireArray(dtype=a.dtype, shape=tuple(a.shape), data=a.data)
    return decode_state(wire, expected), payload_bytes(wire)


def _value_bytes(v: object) -> int:
    if isinstance(v, (list, tuple)):
        return sum(_value_bytes(x) for x in v)
    if isinstance(v, str):
        return len(v.encode("utf-8"))
    if isinstance(v, bytes):
        return len(v)
    if isinstance(v, bool):
        return 1
    return 8  # int and float travel as 64-bit scalars


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's content: every record's name, every key, every value
    (array data as encoded, scalars as 8 bytes, strings as UTF-8). Transport framing
    (gRPC, protobuf tags, message metadata) is not counted."""
    total = 0
    for name, record in content.items():
        total += len(name.encode("utf-8"))
        for k, v in record.items():
            total += len(k.encode("utf-8")) + (len(v.data) if isinstance(v, Array) else _value_bytes(v))
    return total
