"""Sending a batch of messages and collecting the replies, promptly.

Flower's ``HttpGrid.send_and_receive`` (the Deployment Engine's grid) checks for replies every
3 s; a secure round has eight exchanges, so that alone added up to 24 s a round on loopback.
Here the same two public ``Grid`` calls (``push_messages``, ``pull_messages``) are polled every
``poll`` seconds (0.1 s: one small HTTP request to the SuperLink). Other grids (the in-process
one, the Ray simulation's) keep their own ``send_and_receive``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


def _polls_slowly(grid: Grid) -> bool:
    try:
        from flwr.superlink.grid.http_grid import HttpGrid
    except ImportError:  # another Flower version: its own send_and_receive
        return False
    return isinstance(grid, HttpGrid)


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float | None, poll: float = 0.1) -> list[Message]:
    """Push ``messages`` and return the replies that arrive within ``timeout`` seconds
    (``None``: until every message has its reply)."""
    messages = list(messages)
    if not messages:
        return []
    if not _polls_slowly(grid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll)
    return replies
