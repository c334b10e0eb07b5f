"""The coordinator's SuperLink behind a gate: sites reach the Fleet API, nobody else reaches more.

Flower 1.41's ``flower-superlink`` serves its Fleet API (SuperNodes), Control API (``flwr run``,
``flwr supernode register``, ...) and Runtime API (SuperExec, the ServerApp) on ONE port, and
site authentication covers SuperNodes only: anyone who reaches that port with the public
``ca.pem`` could start an app of their own on the coordinator. This launcher starts the same
SuperLink (Flower's own argument parsing, lifespan and FastAPI app) in one uvicorn server with
two sockets, both with the same TLS:

* Flower's ``--host``/``--port``, which must be a loopback address: everything (Control and
  Runtime APIs for the coordinator's own ``flwr`` CLI, SuperExec and ServerApp; Fleet too);
* ``--public HOST:PORT`` (the operator's ``--address``): the Fleet API's paths and ``/health``
  only; any other path answers 403 and is logged. The socket is bound at start (a port in use
  fails at once) but listens only once ``--ready-file`` appears: ``fedlora server`` writes it
  (atomically) after it registered the site keys, so that no site connecting early is told its key is
  refused (until then a site's connection is refused, which its SuperNode retries).

The ready file (JSON) also names the SHA-256 of the FAB ``fedlora server`` built: the loopback
socket then accepts exactly one StartRun, that FAB's, with no app spec and no run-config
overrides; every other StartRun answers 403. A middleware outermost around Flower's app tells
the two sockets apart by the local address the request came in on (``scope["server"]``): the
loopback port on a loopback address is private, everything else public (fail closed).

Usage (``fedlora server`` starts it; Flower's own arguments follow ``--``)::

    python -m fedlora.server.superlink_gate --public 0.0.0.0:9092 --ready-file HOME/gate-ready.json \
        -- --host 127.0.0.1 --port 40123 --ssl-certfile ... --ssl-keyfile ... --ssl-ca-certfile ... --enable-supernode-auth

Pinned to Flower 1.41 (its lifespan config parser and ``create_app`` are not public API).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fedlora.gate")

FLOWER_VERSION = "1.41."  # the SuperLink internals this launcher reuses (flwr==1.41.0 in pyproject.toml)
START_RUN = "/v1/control/start-run"
HEALTH = frozenset({"/health"})
MAX_START_RUN_BYTES = 16 << 20  # fedlora's FAB is a pyproject.toml of about 1 kB

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PUBLIC_REFUSED = ("this address serves only the Fleet API of fedlora's SuperLink (the sites' SuperNodes); the Control and "
                  "Runtime APIs (flwr run, flwr supernode register, ...) are reachable only on the coordinator's own loopback")


def fleet_paths() -> frozenset[str]:
    """The Fleet API's paths, as Flower's own router declares them (what a SuperNode calls)."""
    from flwr.superlink.routers.fleet.router import router

    return frozenset(route.path for route in router.routes)  # type: ignore[attr-defined]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class StartRunPolicy:
    """The one StartRun the private socket accepts: fedlora server's own FAB (by SHA-256), no
    app spec, no run-config overrides, once. Unarmed (``fab_sha256`` None) it accepts none."""

    fab_sha256: str | None = None
    used: bool = False

    def refusal(self, body: bytes) -> str | None:
        """Why this StartRun request body is refused, or None (and the one StartRun is used up)."""
        from flwr.proto.control_pb2 import StartRunRequest
        from google.protobuf.message import DecodeError

        if self.used:
            return "this SuperLink has started its run (fedlora server's own) and starts no other"
        if self.fab_sha256 is None:
            return "fedlora server has not submitted its run yet; this SuperLink starts no other"
        try:
            req = StartRunRequest.FromString(body)
        except DecodeError:
            return "not a StartRun request"
        digest = hashlib.sha256(req.fab.content).hexdigest()
        if req.app_spec or digest != self.fab_sha256 or req.fab.hash_str != digest:
            return "only fedlora's own ServerApp runs on this SuperLink (this is not the FAB fedlora server built)"
        if len(req.override_config):
            return "fedlora's run takes no --run-config overrides"
        self.used = True
        return None


async def _refuse(scope: Scope, send: Send, status: int, detail: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
        return
    body = json.dumps({"detail": f"fedlora: {detail}"}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None when it is longer than ``limit`` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None  # the client went away
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


class SuperLinkGate:
    """ASGI middleware, outermost around the SuperLink's app. A request that came in on
    ``private_port`` at a loopback address passes (StartRun checked by ``policy``); on any other
    socket only ``public_paths`` (HTTP) pass, everything else gets 403 with a body that says why."""

    def __init__(self, app: ASGIApp, private_port: int, policy: StartRunPolicy | None = None,
                 public_paths: frozenset[str] | None = None) -> None:
        self.app, self.private_port = app, private_port
        self.policy = policy or StartRunPolicy()
        self.public_paths = (fleet_paths() if public_paths is None else public_paths) | HEALTH
        self.refused = 0

    def is_private(self, scope: Scope) -> bool:
        server = scope.get("server")
        return bool(server) and server[1] == self.private_port and is_loopback(str(server[0]))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.is_private(scope):
            if scope["type"] == "http" and scope.get("method") == "POST" and path == START_RUN:
                body = await _read_body(receive, MAX_START_RUN_BYTES)
                if body is None:
                    await self._deny(scope, send, 413, "StartRun request too large or cut short")
                    return
                if (why := self.policy.refusal(body)) is not None:
                    await self._deny(scope, send, 403, why)
                    return
                log.info("fedlora gate: StartRun of fedlora's own ServerApp accepted (FAB %s)", self.policy.fab_sha256)
                receive = _replay(body, receive)
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and path in self.public_paths:
            await self.app(scope, receive, send)
            return
        await self._deny(scope, send, 403, PUBLIC_REFUSED)

    async def _deny(self, scope: Scope, send: Send, status: int, why: str) -> None:
        self.refused += 1
        client = scope.get("client") or ("?", 0)
        log.warning("fedlora gate: refused %s %s from %s:%s on %s: %s", scope.get("method", scope["type"]), scope.get("path", ""),
                    client[0], client[1], scope.get("server"), why)
        await _refuse(scope, send, status, why)


def read_ready(path: Path) -> str:
    """The FAB SHA-256 the ready file names (``{"fab_sha256": "<64 hex>"}``)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    digest = doc.get("fab_sha256") if isinstance(doc, dict) else None
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"{path}: fab_sha256 must be 64 lowercase hex digits, got {digest!r}")
    return digest


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and not yet listening (connections are refused)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def _gated_server_class() -> type:
    import uvicorn

    class GatedServer(uvicorn.Server):
        """uvicorn's Server on the private socket(s), plus a public socket it starts serving
        once the ready file appears (checked on every tick, 0.1 s)."""

        def __init__(self, config: uvicorn.Config, public: socket.socket, public_name: str, ready: Path, gate: SuperLinkGate) -> None:
            super().__init__(config)
            self.public, self.public_name, self.ready, self.gate = public, public_name, ready, gate
            self.public_open, self.failed = False, ""

        async def on_tick(self, counter: int) -> bool:
            if not self.public_open and not self.should_exit and self._ready_written():
                await self._open_public()
            return await super().on_tick(counter)

        def _ready_written(self) -> bool:
            try:
                return self.ready.stat().st_size > 0
            except OSError:
                return False

        async def _open_public(self) -> None:
            try:
                self.gate.policy.fab_sha256 = read_ready(self.ready)
            except (OSError, ValueError) as e:
                self.failed = f"the ready file is unusable: {e}"
                self.should_exit = True
                return
            config = self.config

            def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
                return config.http_protocol_class(config=config, server_state=self.server_state,  # type: ignore[call-arg]
                                                  app_state=self.lifespan.state, _loop=_loop)

            server = await asyncio.get_running_loop().create_server(create_protocol, sock=self.public, ssl=config.ssl,
                                                                    backlog=config.backlog)
            self.servers.append(server)
            self.public_open = True
            log.info("fedlora gate: Fleet API (the sites) open on %s", self.public_name)

    return GatedServer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedlora.server.superlink_gate",
                                description="Flower's SuperLink with its Control and Runtime APIs on loopback only; the "
                                            "public address serves the Fleet API once the ready file appears. Flower's "
                                            "flower-superlink arguments follow '--' (--host must be a loopback address).")
    p.add_argument("--public", required=True, metavar="HOST:PORT", help="the address the sites reach (Fleet API only)")
    p.add_argument("--ready-file", required=True, type=Path,
                   help="JSON {\"fab_sha256\": ...} written once the site keys are registered: opens the public address and "
                        "arms the one StartRun")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, flower_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = _parser().parse_args(ours)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    from flwr.supercore.version import package_version

    from fedlora.processes import parse_address

    if not package_version.startswith(FLOWER_VERSION):
        log.error("fedlora gate: needs Flower %sx (its SuperLink internals), found %s", FLOWER_VERSION, package_version)
        return 2
    public_host, public_port = parse_address(args.public, "--public")

    # Flower's own parsing of flower-superlink's arguments (it reads sys.argv)
    import importlib

    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the module (flwr.superlink.cli exports a function of its name)
    sys.argv = ["flower-superlink", *flower_args]
    config = fs._parse_superlink_lifespan_config()
    if not is_loopback(config.host):
        log.error("fedlora gate: Flower's --host %s is not a loopback address: the Control and Runtime APIs would be public",
                  config.host)
        return 2
    if config.port == public_port:
        log.error("fedlora gate: --public and Flower's --port are both %d", public_port)
        return 2
    try:
        public = bind_socket(public_host, public_port)
        private = bind_socket(config.host, config.port)
    except OSError as e:
        log.error("fedlora gate: cannot bind %s or %s:%d: %s", args.public, config.host, config.port, e)
        return 2

    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler, update_console_handler
    from flwr.superlink.main import create_app

    if not sys.stdout.isatty():  # a log file (superlink.log): timestamps, and no terminal colour codes
        update_console_handler(timestamps=True, colored=False)

    gate = SuperLinkGate(create_app(config, fs.SuperLinkLifespan), private_port=config.port)
    uv = uvicorn.Config(app=gate, host=config.host, port=config.port, reload=False, access_log=True,
                        log_config=get_uvicorn_log_config(console_handler.level), ssl_keyfile=config.ssl_keyfile,
                        ssl_certfile=config.ssl_certfile, workers=1,
                        timeout_graceful_shutdown=5)  # SIGTERM: in-flight requests get 5 s (Flower's default waits without end)
    server = _gated_server_class()(uv, public, args.public, args.ready_file, gate)
    scheme = "http (INSECURE)" if config.certificates is None else "https"
    log.info("fedlora gate: Control and Runtime APIs (this machine only) on %s %s:%d; Fleet API for the sites on %s once the "
             "site keys are registered", scheme, config.host, config.port, args.public)
    try:
        server.run(sockets=[private])
    finally:
        public.close()
    if server.failed or not server.started:
        log.error("fedlora gate: %s", server.failed or "the SuperLink did not start (see above)")
        return 1
    log.info("fedlora gate: stopped (%d request(s) refused)", gate.refused)
    return 0


if __name__ == "__main__":
    sys.exit(main())
