"""Flower's SuperNode, with its idle waits shortened: ``python -m fedlora.client.supernode_main
<flower-supernode args>`` is ``flower-supernode <args>`` (Flower's own entry point, same flags,
same output), except for how long it sleeps when there is nothing to do.

Flower 1.41's SuperNode main loop (``flwr/supernode/start_client_internal.py``) pulls the
SuperLink for a message and, when there is none, sleeps 3 s (``time.sleep(3)`` in
``start_client_internal``, line ~263) before it asks again; after handing a message to the
ClientApp it checks for the reply every 0.5 s (``_push_messages``, lines ~470 and ~506). A
secure 3-site round makes about eight exchanges one after another, so a site spent about 25 s
of every round asleep.

Here the idle pull waits ``pull_interval(idle)``: 0.05 s right after the site's last message
(the next stage of a round comes within a second or so), growing by 1/20 of the time the site
has been idle, to at most 0.5 s. So a message waits at most 5 % of the site's idle time, and
never over 0.5 s, while a site idle for long asks about twice a second, not ten times: each pull
costs the SuperLink CPU (measured on 2 cores: a fixed 0.1 s took 10 % of a core at the SuperLink
per site, Flower's 3 s about 1 %). The reply checks wait ``REPLY_INTERVAL`` (a look at the
SuperNode's own state, no request).

Only that module of this process sees the change: its ``time`` is replaced by a stand-in whose
``sleep`` maps 3 s and 0.5 s to the short waits (any other duration and every other function is
the real ``time``'s), and its ``_pull_and_store_message`` (when it got a message) and
``_push_messages`` mark the site active. If the installed Flower no longer sleeps there that
way the SuperNode runs as Flower wrote it, with a warning.

Pulling sooner meets a race Flower's 3 s hid: a message is listed (at the SuperLink, then at the
SuperNode for the site's ClientApp) before all its objects (the arrays and records) have arrived,
and Flower's ``pull_objects`` waits 1 s, then 2, 4, ... 10 s (``PULL_INITIAL_BACKOFF``) before it
asks again for an object not there yet (so an object that came 0.3 s late was fetched 1 s late,
one 1.1 s late 3 s late). ``prompt_object_pulls`` gives one module's pulls (the SuperNode's here;
the ClientApp worker's in ``fedlora client``) retries after ``OBJECT_BACKOFF``, doubling up to
``OBJECT_BACKOFF_CAP``, with no limit on the number of tries: Flower's limit on the total time
(``PULL_MAX_TIME``, 2 h) still holds, so a large object on a slow link is still waited for.
"""

from __future__ import annotations

import functools
import importlib
import sys
import time
import types
from collections.abc import Callable

PULL_FIRST = 0.05  # seconds between two empty pulls right after a message (Flower: 3 s, always) ...
PULL_GROWTH = 1 / 20  # ... plus this fraction of the time since the site's last message ...
PULL_MAX = 0.5  # ... up to this
REPLY_INTERVAL = 0.05  # seconds between two checks for the ClientApp's reply (Flower: 0.5 s)
OBJECT_BACKOFF = 0.05  # seconds before the first retry of an object not yet there (Flower: 1 s) ...
OBJECT_BACKOFF_CAP = 0.1  # ... doubling up to this (Flower: 10 s)
OBJECT_PULL = {"initial_backoff": OBJECT_BACKOFF, "backoff_cap": OBJECT_BACKOFF_CAP, "max_tries_per_object": None}  # None: Flower's 2 h bound
_PULLS = ("pull_objects", "pull_and_inflate_object_from_tree")  # Flower's object pulls, imported by name where they are used
_ACTIVITY = ("_pull_and_store_message", "_push_messages")  # start_client_internal's steps that mean a message came or went


def pull_interval(idle: float) -> float:
    """Seconds to wait before the next pull, ``idle`` seconds after the site's last message."""
    return min(PULL_MAX, max(PULL_FIRST, idle * PULL_GROWTH))


class _Pacer:
    """When the site last had a message; the idle pull wait that follows from it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock, self.last = clock, clock()

    def active(self) -> None:
        self.last = self.clock()

    def wait(self) -> float:
        return pull_interval(self.clock() - self.last)


class _Paced(types.ModuleType):
    """The ``time`` module as ``start_client_internal`` sees it: Flower's idle sleeps shortened
    (``waits``: Flower's duration -> ours, a number or a function giving it)."""

    def __init__(self, real: types.ModuleType, waits: dict[float, float | Callable[[], float]]) -> None:
        super().__init__(real.__name__, real.__doc__)
        self._real, self._waits = real, dict(waits)

    def sleep(self, seconds: float) -> None:
        ours = self._waits.get(seconds, seconds)
        self._real.sleep(ours() if callable(ours) else ours)

    def __getattr__(self, name: str) -> object:  # everything but sleep: the real module's
        return getattr(self._real, name)


def _marking(fn: Callable, pacer: _Pacer, when_none: bool) -> Callable:
    """``fn``, marking the site active after each call (one returning ``None`` only if ``when_none``)."""

    @functools.wraps(fn)
    def marked(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - Flower's own signature
        out = fn(*args, **kwargs)
        if out is not None or when_none:
            pacer.active()
        return out

    marked._fedlora_marked = True  # type: ignore[attr-defined]
    return marked


def shorten_idle_waits(module: types.ModuleType | None = None, pacer: _Pacer | None = None) -> bool:
    """Give ``module`` (default: Flower's ``start_client_internal``) the short idle waits; True
    if it was patched (False, with a warning on stderr, if it does not use ``time`` as expected)."""
    if module is None:
        from flwr.supernode import start_client_internal as module
    here = getattr(module, "time", None)
    if isinstance(here, _Paced):
        return True
    if here is not time:
        print(f"fedlora: warning: {module.__name__} does not use the time module as Flower 1.41 does; the SuperNode keeps "
              "Flower's 3 s idle pull interval", file=sys.stderr, flush=True)
        return False
    pacer = pacer or _Pacer()
    for name, when_none in zip(_ACTIVITY, (False, True)):  # a pull that found nothing is no activity; a push always is
        fn = getattr(module, name, None)
        if callable(fn) and not getattr(fn, "_fedlora_marked", False):
            setattr(module, name, _marking(fn, pacer, when_none))
    module.time = _Paced(time, {3: pacer.wait, 0.5: REPLY_INTERVAL})
    return True


def prompt_object_pulls(module: types.ModuleType | str) -> list[str]:
    """Bind Flower's object pulls in ``module`` (a module or its name) to the same with
    ``OBJECT_PULL``'s retries; returns the names rebound (none if already done)."""
    if isinstance(module, str):
        module = importlib.import_module(module)
    done = []
    for name in _PULLS:
        fn = getattr(module, name, None)
        if fn is None or getattr(fn, "_fedlora_prompt", False):
            continue
        prompt = functools.partial(fn, **OBJECT_PULL)
        prompt._fedlora_prompt = True  # type: ignore[attr-defined]
        setattr(module, name, prompt)
        done.append(name)
    return done


def main(argv: list[str] | None = None) -> None:
    """Run Flower's ``flower-supernode`` with ``argv`` (default: this process's arguments)."""
    shorten_idle_waits()
    prompt_object_pulls("flwr.supernode.start_client_internal")  # a message's objects from the SuperLink
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()


if __name__ == "__main__":
    main()
