"""An in-process ``Grid``: the ServerApp's messages go straight to ClientApp calls.

Same Message API as Flower's SuperLink, no processes, no serialisation: each virtual node has
a persistent ``Context`` (node config ``partition-id``/``num-partitions``, as on Flower's
Simulation Engine) and nodes are served one after another in the calling thread, so every
virtual site shares the process's single base model. A ``timeout`` is honoured as a deadline
for the whole batch: a reply produced after it is dropped, as a real grid would stop waiting
(the nodes run one after another here, so their times add up).

A node's ``Context`` is made when it is first sent a message, so a population of 100,000 virtual
sites of which a few are sampled costs only what the sampled ones hold. With a ``roster`` (the
partition ids' site names and cohorts, from a lazy population) the grid names its nodes itself
(``roster``, read by ``fedlora.server.coordinator.node_roster``) and nobody is asked at discovery.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterable, Sequence
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger("fedlora.simulation")
CLIENT_EXCEPTION = 4200  # Error.code for an exception raised inside the ClientApp


class LocalGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1, roster: Sequence[tuple[str, str]] | None = None) -> None:
        self._client_app = client_app
        self._num_nodes, self._run_id = num_nodes, run_id
        self._names = roster  # partition id -> (site name, cohort), or None
        self._run = Run.create_empty(run_id)
        # Messages take their sender's identity from the process-wide TaskIdentity (as in
        # flwr.simulation.run_simulation): here the ServerApp is the SuperLink side.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        self._contexts: dict[int, Context] = {}  # made when a node is first sent a message (``_context``)
        self._replies: dict[str, Message] = {}

    def _context(self, node_id: int) -> Context | None:
        """The persistent context of node ``node_id`` (made on first use), None for no node of this grid.
        Node ids start at 1001 so they are never confused with partition ids."""
        ctx = self._contexts.get(node_id)
        if ctx is None and 0 <= node_id - 1001 < self._num_nodes:
            ctx = self._contexts[node_id] = Context(run_id=self._run_id, node_id=node_id, state=RecordDict(), run_config={},
                                                    node_config={"partition-id": node_id - 1001, "num-partitions": self._num_nodes})
        return ctx

    @property
    def roster(self) -> dict[int, tuple[str, str]] | None:
        """Node id -> (site name, cohort) when the grid was given its population's names, else None."""
        if self._names is None:
            return None
        return {1001 + i: tuple(entry) for i, entry in enumerate(self._names)}  # type: ignore[misc]

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return range(1001, 1001 + self._num_nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            ctx = self._context(msg.metadata.dst_node_id)
            if ctx is None:
                raise ValueError(f"no node {msg.metadata.dst_node_id} in this grid")
            try:
                reply = self._client_app(msg, ctx)
            except Exception as e:  # like Flower's engines: a crash at a site becomes an error reply
                log.error("site (node %s) raised: %s", msg.metadata.dst_node_id, "".join(traceback.format_exception_only(e)).strip())
                reply = Message(Error(code=CLIENT_EXCEPTION, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        if timeout is None:
            return self.pull_messages(self.push_messages(messages))
        deadline, replies = time.monotonic() + timeout, []
        for msg in messages:
            got = self.pull_messages(self.push_messages([msg]))
            if time.monotonic() > deadline:
                log.warning("node %s replied after the %.3g s timeout; its reply is dropped", msg.metadata.dst_node_id, timeout)
                continue
            replies += got
        return replies
