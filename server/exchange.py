"""Sending a batch of messages and collecting the replies, promptly and within a time limit.

Flower's ``HttpGrid.send_and_receive`` (the Deployment Engine's grid) checks for replies every
3 s (``flwr/superlink/grid/http_grid.py``, ``time.sleep(3)``); a secure round has eight
exchanges, so that alone added up to 24 s a round on loopback. Here the same two public
``Grid`` calls (``push_messages``, ``pull_messages``) are polled: every 0.05 s at first (the
secure-aggregation stages are answered within a second or so), then every 1/20 of the time
waited so far, at most every 0.5 s (``poll_interval``): a reply waits at most 5 % of the
exchange's time, and a long wait (the sites training) costs the SuperLink two small requests a
second, not ten. The sites' side of the same wait is
``fedlora.client.supernode_main``. A reply can be listed before all its objects have reached
the SuperLink; Flower's ``pull_objects`` then waits 1 s before asking again (then 2, 4, ...
10 s): in the ServerApp's process ``HttpGrid``'s pulls retry as the SuperNode's do
(``prompt_reply_pulls``: ``fedlora.client.supernode_main.OBJECT_PULL``'s 0.05 s doubling up to
0.1 s, Flower's 2 h bound on the total).

Time limits. ``with_timeouts`` wraps the engine's grid with a limit per message kind
(``federation.train_timeout``, ``evaluate_timeout``, ``query_timeout``); a caller's own
``timeout`` (the secure-aggregation stages': ``secure_aggregation.stage_timeout``) wins. A
message whose reply has not come within its limit gets a stand-in error reply
(``TIMED_OUT_CODE``, reason ``timed out after N s (key)``), so the coordinator leaves that
site out of the round and names it with the reason, instead of waiting for Flower's 12 h
message TTL. The limit runs from the push for every site alike: in a deployment the sites
answer in parallel; the in-process engine (``LocalGrid``), which serves its sites one after
another, is sent one message at a time so that each site's own time is what is measured, as
in a deployment. Other grids (the Ray simulation's) keep their own ``send_and_receive``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import time
from collections.abc import Iterable, Mapping

from flwr.app import Error, Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedlora.config import FederationConfig

log = logging.getLogger("fedlora.server")

TIMED_OUT_CODE = 4290  # Error.code of the coordinator's stand-in reply for a site that did not answer in time (no site sends it)
STAGE_KEY = "secure_aggregation.stage_timeout"  # the limit of the messages of a secure-aggregation stage (``train.secagg_*``)
POLL_FIRST, POLL_GROWTH, POLL_MAX = 0.05, 1 / 20, 0.5  # seconds between two pulls: first, fraction of the time waited, at most
# HttpGrid's retries of a reply's object not yet at the SuperLink (Flower: after 1 s, doubling to 10 s, at most 500 tries)
OBJECT_PULL = {"initial_backoff": 0.05, "backoff_cap": 0.1, "max_tries_per_object": None}  # None: Flower's 2 h time bound only


class TimedGrid(Grid):
    """``grid`` with a time limit per message kind (``limits``: kind -> (seconds, config key));
    ``names`` (node id -> site name, where known) names the sites in the log. Every other call
    goes to ``grid``; ``send_and_receive`` is this module's."""

    def __init__(self, grid: Grid, limits: Mapping[str, tuple[float, str]], names: Mapping[int, str] | None = None) -> None:
        self.inner, self.limits, self.names = grid, dict(limits), dict(names or {})

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: ANN002, ANN003 - Grid's own signature
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return send_and_receive(self, messages, timeout=timeout)


def with_timeouts(grid: Grid, cfg: FederationConfig, names: Mapping[int, str] | None = None) -> TimedGrid:
    """``grid`` with the ``train``, ``evaluate`` and ``query`` limits of ``cfg``."""
    return TimedGrid(grid, {kind: (float(getattr(cfg, f"{kind}_timeout")), f"federation.{kind}_timeout")
                            for kind in ("train", "evaluate", "query")}, names)


def _limit(messages: list[Message], timeout: float | None, limits: Mapping[str, tuple[float, str]]) -> tuple[float | None, str]:
    """The batch's limit and the config key it comes from ("" if unknown): the caller's
    ``timeout``, else the longest limit of the batch's kinds (a kind ``train.x`` without its own:
    ``train``'s), else none (``None``)."""
    kinds = {m.metadata.message_type for m in messages}
    if timeout is not None:
        return timeout, STAGE_KEY if all(".secagg_" in k for k in kinds) else ""
    known = [hit for k in kinds if (hit := limits.get(k) or limits.get(k.partition(".")[0]))]
    return max(known) if known else (None, "")


def _is(grid: Grid, module: str, name: str) -> bool:
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # another Flower version: its own send_and_receive
        return False
    return isinstance(grid, cls)


def prompt_reply_pulls() -> bool:
    """Give Flower's ``HttpGrid`` (``flwr.superlink.grid.http_grid``, which imports ``pull_objects``
    by name) ``OBJECT_PULL``'s retries; True once done (also if already done)."""
    try:
        module = importlib.import_module("flwr.superlink.grid.http_grid")
    except ImportError:
        return False
    fn = getattr(module, "pull_objects", None)
    if fn is None:
        return False
    if not getattr(fn, "_fedlora_prompt", False):
        prompt = functools.partial(fn, **OBJECT_PULL)
        prompt._fedlora_prompt = True  # type: ignore[attr-defined]
        module.pull_objects = prompt
    return True


def poll_interval(waited: float) -> float:
    """Seconds to the next pull, ``waited`` seconds after the push."""
    return min(POLL_MAX, max(POLL_FIRST, waited * POLL_GROWTH))


def _poll(grid: Grid, messages: list[Message], deadline: float | None) -> list[Message]:
    """Push, then pull (``poll_interval`` apart) until every message has its reply or ``deadline``.
    A message the SuperLink did not take (Flower returns ``None`` for its id) gets a stand-in
    error reply at once."""
    start = time.monotonic()
    ids = list(grid.push_messages(messages))
    pending = {i for i in ids if i}
    replies = [Message(Error(code=TIMED_OUT_CODE, reason="the SuperLink did not accept the message"), reply_to=m)
               for m, i in zip(messages, ids) if not i]
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        now = time.monotonic()
        if not pending or (deadline is not None and now >= deadline):
            break
        wait = poll_interval(now - start)
        time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - now)))
    return replies


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float | None) -> list[Message]:
    """Push ``messages`` and return their replies: those that arrive within the limit (the
    caller's ``timeout`` in seconds; else, on a ``TimedGrid``, its limit for the batch's kind;
    ``None``: until every message has its reply), plus, for every message that has none by
    then, a stand-in error reply (``TIMED_OUT_CODE``: ``timed out after N s (key)``), logged
    with the site's name where known."""
    messages = list(messages)
    if not messages:
        return []
    limits: Mapping[str, tuple[float, str]] = {}
    names: Mapping[int, str] = {}
    if isinstance(grid, TimedGrid):
        grid, limits, names = grid.inner, grid.limits, grid.names
    seconds, key = _limit(messages, timeout, limits)
    if _is(grid, "flwr.superlink.grid.http_grid", "HttpGrid"):
        prompt_reply_pulls()  # this process talks to a SuperLink: the ServerApp's
        replies = _poll(grid, messages, None if seconds is None else time.monotonic() + seconds)
    elif seconds is not None and _is(grid, "fedlora.simulation.local_grid", "LocalGrid"):
        replies = [r for m in messages for r in grid.send_and_receive([m], timeout=seconds)]  # each site's own time
    else:
        replies = list(grid.send_and_receive(messages, timeout=seconds))
    if seconds is None:
        return replies
    answered = {r.metadata.reply_to_message_id for r in replies}
    why = f"timed out after {seconds:g} s" + (f" ({key})" if key else "")
    for m in messages:
        if m.metadata.message_id not in answered:
            node = m.metadata.dst_node_id
            who = f"site {names[node]} (node {node})" if node in names else f"node {node}"
            log.warning("%s sent no %s reply: %s; it is left out", who, m.metadata.message_type, why)
            replies.append(Message(Error(code=TIMED_OUT_CODE, reason=why), reply_to=m))
    return replies
