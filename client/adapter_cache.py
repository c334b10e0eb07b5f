"""The global adapters a site holds, by digest, so that the coordinator need not send one twice.

A ``train`` or ``evaluate`` message names its adapter by ``records.adapter_digest``
(``protocol.AdapterRef``); the record itself comes only when the coordinator believes the site
does not hold it yet. ``adapter_for`` is the one way a site gets the adapter of a message:

* the record came: its bytes must hash to the named digest (else ``ProtocolError``: a
  coordinator cannot pair one digest with different bytes for different sites, which the
  secure-aggregation request digest relies on, since it covers the digest and not the bytes);
  it is kept;
* only the digest came: the adapter kept under it, or ``AdapterNotHeld`` (the coordinator then
  resends the message in full);
* neither a digest nor a record: ``ProtocolError`` naming the missing record.

The cache is content-addressed (a digest names exactly one byte string), so the virtual sites
of one simulation process share it safely; it keeps the ``MAX_ADAPTERS`` most recently used
adapters (a few per cohort: the one being trained and the one just aggregated).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from flwr.app import ArrayRecord, RecordDict

from fedlora.errors import AdapterNotHeld, ProtocolError
from fedlora.protocol import AdapterRef, arrays, read
from fedlora.records import adapter_digest

MAX_ADAPTERS = 16

_held: OrderedDict[str, ArrayRecord] = OrderedDict()
_lock = threading.Lock()


def adapter_for(content: RecordDict, kind: str) -> ArrayRecord:
    """The adapter record a message is about (see the module docstring)."""
    if AdapterRef.record not in content:
        return arrays(content, "adapter", kind)  # a message without a reference carries its adapter
    digest = read(AdapterRef, content, kind).digest
    if "adapter" in content:
        record = arrays(content, "adapter", kind)
        got = adapter_digest(record)
        if got != digest:
            raise ProtocolError(f"{kind}: the adapter's bytes hash to {got[:16]}..., not to the digest {digest[:16]}... the message "
                                "names (refused: one digest must name one adapter)")
        keep(digest, record)
        return record
    with _lock:
        record = _held.get(digest)
        if record is not None:
            _held.move_to_end(digest)
    if record is None:
        raise AdapterNotHeld(f"{kind}: this site does not hold the adapter {digest[:16]}... the message names; send it in full")
    return record


def keep(digest: str, record: ArrayRecord) -> None:
    with _lock:
        _held[digest] = record
        _held.move_to_end(digest)
        while len(_held) > MAX_ADAPTERS:
            _held.popitem(last=False)


def forget() -> None:
    """Let every kept adapter go (a restarted site holds none; tests)."""
    with _lock:
        _held.clear()
