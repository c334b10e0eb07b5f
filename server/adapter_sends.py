"""No adapter sent twice: the coordinator remembers which global adapter each site holds.

Every ``train`` / ``evaluate`` message names its cohort's adapter by digest (``AdapterRef``,
``records.adapter_digest``). A site that answered a message naming digest D without an error
holds D (``fedlora.client.adapter_cache``), so the next message naming D (the next round's
``train`` after this round's ``evaluate``, a round asked again) goes without the adapter's
bytes. A site that no longer holds it (restarted, or its cache let it go) answers
``ADAPTER_NOT_HELD_CODE`` and gets the message again in full, once, within the same exchange.
Bytes down per site-round then come close to bytes up. The site never trusts the digest alone:
it uses only an adapter whose bytes hash to it.

On the Ray engine a virtual site may run in another worker process than before, whose cache
(shared by the virtual sites it ran) may lack the adapter: that is a miss, resent in full.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, RecordDict

from fedlora.errors import ADAPTER_NOT_HELD_CODE
from fedlora.protocol import AdapterRef, read


class AdapterSends:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.held: dict[int, str] = {}  # node -> digest of the adapter it last acknowledged
        self.records: dict[str, ArrayRecord] = {}  # digest -> adapter record, for the messages of the current round
        self.not_resent = 0  # messages that went without their adapter's bytes (cumulative)

    def remember(self, digest: str, record: ArrayRecord) -> None:
        """The adapter a message about to be sent names (kept to resend it in full if needed)."""
        self.records[digest] = record

    def content_for(self, node: int, content: RecordDict) -> RecordDict:
        """``content`` as sent to ``node``: without the adapter's bytes when the node holds them."""
        if not self.enabled or AdapterRef.record not in content or "adapter" not in content:
            return content
        if self.held.get(node) != read(AdapterRef, content, "train").digest:
            return content
        self.not_resent += 1
        return RecordDict({name: record for name, record in content.items() if name != "adapter"})

    def resend(self, sent: list[Message], replies: dict[int, Message]) -> list[Message]:
        """The messages to send again in full: those that went without their adapter and whose
        site answered that it does not hold it."""
        out = []
        for m in sent:
            reply = replies.get(m.metadata.dst_node_id)
            if (reply is None or not reply.has_error() or reply.error.code != ADAPTER_NOT_HELD_CODE or "adapter" in m.content
                    or AdapterRef.record not in m.content):
                continue
            digest = read(AdapterRef, m.content, m.metadata.message_type).digest
            self.held.pop(m.metadata.dst_node_id, None)
            self.not_resent -= 1
            full = RecordDict({**m.content, "adapter": self.records[digest]})
            out.append(Message(full, m.metadata.dst_node_id, m.metadata.message_type, group_id=m.metadata.group_id))
        return out

    def by_site(self, names: dict[int, str]) -> dict[str, str]:
        """What the checkpoint keeps: site name -> digest of the adapter it holds."""
        return {names[node]: digest for node, digest in sorted(self.held.items()) if node in names}

    def restore(self, held: dict[str, str], nodes: dict[int, str]) -> None:
        """After a resume: the sites (by name, ``nodes``: node id -> name) hold what they held;
        one that restarted since says it does not and is sent the adapter in full."""
        by_name = {name: node for node, name in nodes.items()}
        self.held = {by_name[site]: digest for site, digest in held.items() if site in by_name}

    def acknowledge(self, sent: list[Message], replies: dict[int, Message]) -> None:
        """A site that answered a message naming an adapter without an error holds it now."""
        for m in sent:
            reply = replies.get(m.metadata.dst_node_id)
            if reply is not None and not reply.has_error() and AdapterRef.record in m.content:
                self.held[m.metadata.dst_node_id] = read(AdapterRef, m.content, m.metadata.message_type).digest
