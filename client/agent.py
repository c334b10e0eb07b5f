"""``fedlora client``: a data site's agent, beside its data.

It checks what it can before connecting (the data file and its columns, the base model it
holds, its key and the CA certificate; a key its group or others can read is refused,
``fedlora.keyfiles``), then runs two things until stopped:

* a Flower SuperNode (``flower-supernode --isolation process``) connected to the coordinator's
  SuperLink with TLS (``--root-cert``) and its site key (``--key``); the site's data path,
  domain, privacy budget, model and device travel in the SuperNode's node config, which never
  leaves the site, and so do the paths of its secure-aggregation signing material: the site key,
  its certificate (``--cert``, default ``<key>.crt`` beside the key) and the CA (``--root-cert``).
  With them the site signs its SecAgg keys and requires its peers' signed by the CA
  (``fedlora.privacy.key_signing``); without a certificate (a certs folder made before
  ``fedlora certs`` wrote them) it warns and runs with unsigned, unchecked keys;
* the site's ClientApp, warm, in this process (``fedlora.client.worker``), executing the
  messages the SuperNode receives.

Connection problems are retried with exponential backoff (1 s, 2 s, ... at most 30 s) for up
to ``--connect-timeout`` seconds without a connection, then reported with the reason read from
the SuperNode (nothing listening, a key the coordinator has not registered). A TLS error that
no retry can fix (a certificate not signed by ``--root-cert``, one that does not name the
coordinator's host) is reported at once. A coordinator that restarts (``fedlora server
--resume``) is reconnected to. The SuperNode's own log is kept in ``<state-dir>/supernode.log``.

Stopping (SIGTERM or Ctrl-C, also in the middle of a round): the ClientApp worker takes no new
message; one it is working on gets ``DRAIN_GRACE`` seconds to be answered (a short message of a
round, e.g. a secure-aggregation stage, still gets its reply out); then the SuperNode is stopped
(it tells the coordinator, which leaves the site out from then on, and takes it back when it
returns), the worker gets ``WORKER_GRACE`` seconds to end, and the process ends with status 0. A
worker still busy then is in the middle of a long message (training: torch cannot be stopped
from another thread): nothing it computes can be sent any more, and every file it writes is
written atomically (the site's privacy ledger is charged before a release, never after), so the
CLI ends the process there (``os._exit`` after flushing its output) instead of letting the
interpreter tear torch down under a running thread ("terminate called without an active
exception", status 134).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

from fedlora.errors import ConfigError, DataError, DeploymentError, FedloraError
from fedlora.processes import flower_env, free_port, parse_address, plain, spawn, stop, wait_for_port

log = logging.getLogger("fedlora.client")

DRAIN_GRACE = 10.0  # seconds a stopping site gives the message its worker is on, before it stops its SuperNode
SEND_WAIT = 3.0  # then seconds for the SuperNode to send that message's reply
WORKER_GRACE = 2.0  # seconds a stopping site gives its ClientApp worker to end once the SuperNode is stopped
REFUSAL_WAIT = 15.0  # seconds a site refused at the handshake waits for its refusal to reach the coordinator
# seconds it stays connected once its refusal is sent: the SuperLink answers the coordinator's pull of a reply from a node
# that has gone offline with "Node Unavailable" instead of the reply, so the site lets the coordinator pull it first
REFUSAL_LINGER = 3.0


@dataclass(frozen=True)
class _Reason:
    pattern: re.Pattern[str]
    text: str  # what it means for the operator of this site ({name}, {root_cert}, {host}, {server})
    fatal: bool  # no retry can fix it: reported at once


# what the SuperNode prints, and what it means; the first match counts (a hostname mismatch is a CERTIFICATE_VERIFY_FAILED too)
_REASONS = [
    _Reason(re.compile(r"Failed to activate SuperNode"),
            "the coordinator refused this site's key: its public key is not registered there (the operator adds {name}.pub to "
            "the coordinator's --certs folder and restarts it), or a SuperNode with this key is still connected (a site that "
            "crashed is let in again once the coordinator sees its old connection gone, within about a minute)", False),
    _Reason(re.compile(r"hostname mismatch|doesn't match|IP address mismatch", re.I),
            "TLS: the coordinator's certificate does not name {host} (fedlora certs --hosts ...)", True),
    _Reason(re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|unable to get local issuer", re.I),
            "TLS: the coordinator's certificate is not signed by the CA in {root_cert} (wrong --root-cert?)", True),
    _Reason(re.compile(r"Connection refused|Errno 111|Name or service not known|timed out", re.I),
            "nothing answers at {server} (is fedlora server running there, and the port open?)", False),
]
_SENT = re.compile(r"Sent successfully|Failed to send message|Ignoring reply message")  # the SuperNode is done with a reply


def reason_of(line: str, opts: SiteOptions) -> tuple[str, bool] | None:
    """What a line of the SuperNode's output means for this site's operator, and whether it is
    fatal (no retry can fix it); None for a line that reports no connection problem."""
    for r in _REASONS:
        if r.pattern.search(line):
            return r.text.format(name=opts.name, root_cert=opts.root_cert, host=opts.server.rpartition(":")[0].strip("[]"),
                                 server=opts.server), r.fatal
    return None


@dataclass(frozen=True)
class SiteOptions:
    server: str
    data: Path
    domain: str
    name: str
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = ""
    response_column: str = ""
    messages_column: str = ""
    key: Path | None = None
    root_cert: Path | None = None
    cert: Path | None = None  # the site's certificate (<site>.crt): signs its secure-aggregation keys
    insecure: bool = False
    device: str = "auto"
    epsilon: float = 0.0
    delta: float = 0.0
    accountant: str = ""
    eval_metrics: str = "site"
    public_size: int = 0
    model: str = ""
    lora_rank: int | None = None  # the LoRA rank this site trains (--lora-rank); None: the cohort's
    state_dir: Path = Path("fedlora-state")
    connect_timeout: float = 300.0
    allow_clear_aggregation: bool = False  # send updates and metrics in the clear when asked without secure aggregation


def check_site(opts: SiteOptions) -> None:
    """Everything that can be checked without the coordinator; raises a FedloraError naming it."""
    from fedlora.config import _NAME
    from fedlora.model import model_fingerprint

    from fedlora.keyfiles import check_root_cert, check_site_key

    from fedlora.tasks import SiteColumns, get_task

    parse_address(opts.server, "--server")
    if not _NAME.match(opts.domain):
        raise ConfigError("--domain", opts.domain, "must be a cohort name: lower-case letters, digits, _ (the coordinator's cohorts)")
    if opts.insecure == (opts.key is not None or opts.root_cert is not None):
        raise ConfigError("--key", str(opts.key), "give --key and --root-cert (TLS, site authentication), or --insecure for neither")
    if not opts.insecure:
        if opts.key is None or opts.root_cert is None:
            raise ConfigError("--root-cert" if opts.key else "--key", None, "both --key and --root-cert are needed")
        check_site_key(opts.key)
        check_root_cert(opts.root_cert)
        if opts.cert is not None:
            check_site_cert(opts)
    if opts.epsilon < 0:
        raise ConfigError("--epsilon", opts.epsilon, "must be positive (0: the coordinator's default budget)")
    if not 0 <= opts.delta < 0.1:
        raise ConfigError("--delta", opts.delta, "must be in (0, 0.1) (0: automatic)")
    if opts.public_size < 0:
        raise ConfigError("--public-size", opts.public_size, "must be a positive number of records (0: automatic)")
    if opts.lora_rank is not None and opts.lora_rank < 1:
        raise ConfigError("--lora-rank", opts.lora_rank, "must be a LoRA rank >= 1 (at most the cohort's lora.rank; checked "
                          "against it when the coordinator names its model)")
    columns = SiteColumns(opts.text_column, opts.label_column, opts.prompt_column, opts.response_column, opts.messages_column)
    instruction = bool(opts.prompt_column or opts.messages_column)  # text/label files serve either task
    get_task("causal_lm" if instruction else "sequence_classification").read(str(opts.data), columns, None)  # readable, columns present
    if opts.model:
        model_fingerprint(opts.model)


def default_cert(key: Path | None, cert: Path | None) -> Path | None:
    """The site's certificate: ``cert`` if given, else ``<key>.crt`` beside the key if it exists."""
    if cert is not None or key is None:
        return cert
    beside = key.with_suffix(".crt")
    return beside if beside.is_file() else None


def check_site_cert(opts: SiteOptions) -> None:
    """The site's certificate fits its key and name (ConfigError otherwise: its peers would
    refuse every secure sum); one not issued by ``--root-cert`` is only warned about here (the
    TLS connection reports a wrong CA)."""
    from fedlora.privacy import key_signing

    assert opts.cert is not None and opts.key is not None and opts.root_cert is not None
    try:
        creds = key_signing.Credentials(opts.name, opts.key.read_text(encoding="ascii"), opts.cert.read_text(encoding="ascii"))
        key_signing.check_own(creds)
    except (OSError, UnicodeDecodeError, key_signing.KeyAuthError) as e:
        raise ConfigError("--cert", str(opts.cert), f"does not fit --key {opts.key} and --name {opts.name}: {e}") from None
    try:
        key_signing.check_own(key_signing.Credentials(creds.name, creds.signing_key, creds.certificate,
                                                      opts.root_cert.read_text(encoding="ascii")))
    except (OSError, UnicodeDecodeError, key_signing.KeyAuthError) as e:
        log.warning("site %s: %s (--cert %s, --root-cert %s)", opts.name, e, opts.cert, opts.root_cert)


def key_identity(key: Path | None) -> str:
    """The site's identity for its privacy ledger: the SHA-256 fingerprint of its public key (the
    key the coordinator registered), so that renaming the site never resets its spend."""
    if key is None:
        return ""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    private = serialization.load_ssh_private_key(key.read_bytes(), None)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return "key:sha256:" + hashlib.sha256(public).hexdigest()[:32]


def node_config(opts: SiteOptions) -> str:
    items = {"domain": opts.domain, "site-name": opts.name, "data-path": str(opts.data.resolve()), "text-column": opts.text_column,
             "label-column": opts.label_column, "state-dir": str(opts.state_dir.resolve()), "device": opts.device}
    for key, value in (("prompt-column", opts.prompt_column), ("response-column", opts.response_column),
                       ("messages-column", opts.messages_column)):
        if value:
            items[key] = value
    for key, value in (("epsilon", opts.epsilon), ("delta", opts.delta), ("accountant", opts.accountant),
                       ("public-size", opts.public_size)):
        if value:
            items[key] = str(value)
    items["eval-metrics"] = opts.eval_metrics
    if opts.lora_rank is not None:  # the site's own: in its node config, never in a message
        items["lora-rank"] = str(opts.lora_rank)
    if opts.allow_clear_aggregation:
        items["allow-clear-aggregation"] = "true"
    identity = key_identity(opts.key)
    if identity:
        items["identity"] = identity
    if opts.cert is not None and opts.key is not None and opts.root_cert is not None and not opts.insecure:
        items |= {"signing-key": str(opts.key.resolve()), "cert": str(opts.cert.resolve()), "ca": str(opts.root_cert.resolve())}
    if opts.model:
        items["model"] = opts.model if opts.model.startswith("packaged:") else str(Path(opts.model).resolve())
    for k, v in items.items():
        if '"' in v:
            raise ConfigError(f"--{k}", v, "must not contain a double quote")
    return " ".join(f'{k}="{v}"' for k, v in items.items())


class SuperNode:
    """One SuperNode process; its output goes to the site's log and is scanned for problems."""

    def __init__(self, opts: SiteOptions, runtime_port: int, log_file: IO[str], wait: float) -> None:
        args = [sys.executable, "-m", "fedlora.client.supernode_main", "--superlink", opts.server, "--isolation", "process", "--host", "127.0.0.1",
                "--port", str(runtime_port), "--node-config", node_config(opts), "--max-wait-time", f"{max(wait, 1.0):.0f}"]
        if opts.insecure:
            args.append("--insecure")
        else:
            assert opts.key is not None and opts.root_cert is not None
            args += ["--root-certificates", str(opts.root_cert.resolve()), "--auth-supernode-private-key", str(opts.key.resolve())]
        self.connected = threading.Event()
        self.reason, self.fatal = "", False
        self.sent = 0  # replies the SuperNode is done sending
        self.on_sent: Callable[[], None] | None = None  # called each time the SuperNode is done sending a reply
        self.proc = spawn(args, flower_env(opts.state_dir / "flower-home"), stdout=subprocess.PIPE, cwd=opts.state_dir)
        self._reader = threading.Thread(target=self._read, args=(opts, log_file), daemon=True)
        self._reader.start()

    def _read(self, opts: SiteOptions, log_file: IO[str]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            log_file.write(plain(line))
            log_file.flush()
            if "SuperNode ID" in line:
                self.connected.set()
            if _SENT.search(line):
                self.sent += 1
                if self.on_sent is not None:
                    self.on_sent()
            if (found := reason_of(line, opts)) is not None:  # the last problem reported is the one that made it give up
                self.reason, self.fatal = found

    def wait(self, stopping: threading.Event, busy: threading.Event | None = None) -> int:
        """Until the SuperNode exits, or ``stopping``: then, the message the worker is on
        (``busy``) answered first (``drain``), stop it. Its exit status."""
        while self.proc.poll() is None and not stopping.is_set():
            stopping.wait(0.2)
        if stopping.is_set():
            if busy is not None:
                self.drain(busy)
            stop(self.proc)
        self._reader.join(5)
        return int(self.proc.returncode or 0)

    def drain(self, busy: threading.Event, grace: float | None = None, send_wait: float | None = None) -> bool:
        """Let the worker finish the message it is on (up to ``grace`` s, default ``DRAIN_GRACE``)
        and this SuperNode send its reply (up to ``send_wait`` s more, default ``SEND_WAIT``); True
        when there was none or its reply went out."""
        if not busy.is_set():
            return True
        grace = DRAIN_GRACE if grace is None else grace
        send_wait = SEND_WAIT if send_wait is None else send_wait
        sent, deadline = self.sent, time.monotonic() + grace
        while busy.is_set() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if busy.is_set():
            return False  # still at work (training): left to end with the process
        deadline = time.monotonic() + send_wait
        while self.sent == sent and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.sent != sent


def _stop_on_signals(stopping: threading.Event) -> Callable[[], None]:
    """SIGTERM and SIGINT set ``stopping`` (in the main thread; elsewhere nothing changes);
    returns what puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    before = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in before.items():
            signal.signal(sig, handler)

    return restore


def _later(seconds: float, fn: Callable[[], None]) -> None:
    """``fn()`` in ``seconds``, on a daemon timer thread."""
    timer = threading.Timer(seconds, fn)
    timer.daemon = True
    timer.start()


def _start_worker(opts: SiteOptions, runtime_port: int, stopping: threading.Event, busy: threading.Event,
                  on_fatal: Callable[[str], None]) -> threading.Thread:
    """The site's ClientApp, warm, executing what the SuperNode at ``runtime_port`` receives
    until ``stopping`` (``fedlora.client.worker``); ``busy`` is set while it works on a message."""
    from .app import make_client_app
    from .supernode_main import prompt_object_pulls
    from .worker import serve

    prompt_object_pulls("flwr.supernode.runtime.run_clientapp")  # a message's objects from the SuperNode, without Flower's 1 s waits
    worker = threading.Thread(target=serve, args=(f"127.0.0.1:{runtime_port}", make_client_app(device=opts.device, on_fatal=on_fatal),
                                                  stopping), kwargs={"busy": busy}, name="fedlora-clientapp", daemon=True)
    worker.start()
    return worker


def _exit_now(code: int) -> NoReturn:
    """End this process at once with ``code`` (``os._exit``), its output and logs flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run_site(opts: SiteOptions, stopping: threading.Event | None = None, say=print, *, hard_exit: bool = False) -> None:
    """Run the site until stopped (SIGTERM, SIGINT or ``stopping``). Raises DeploymentError when
    the coordinator stays unreachable or refuses the site for ``connect_timeout`` seconds, or at
    once for a TLS error no retry fixes; DataError when the site refused to join at the handshake
    (its cohort is not the run's, or its data does not fit the cohort's labels: the message, with
    the details, stays here). Stopping lets the message under way be answered (``SuperNode.drain``)
    and ends the worker between messages; one still busy after that is said so, and with
    ``hard_exit`` (the CLI) the process ends there (``_exit_now``: status 0 when stopped, else the
    error's, printed first)."""
    stopping = stopping or threading.Event()
    restore = _stop_on_signals(stopping)
    try:
        _run_site(opts, stopping, say, hard_exit)
    finally:
        restore()


def _run_site(opts: SiteOptions, stopping: threading.Event, say, hard_exit: bool) -> None:
    check_site(opts)
    logging.getLogger("flwr").setLevel(logging.ERROR)  # the worker's retries while the SuperNode (re)connects are expected
    site_log = logging.getLogger("fedlora.client")  # one line per round at the site: what it trained, what it spent
    if not any(getattr(h, "fedlora_site", False) for h in site_log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.fedlora_site = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(asctime)s fedlora client %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
        site_log.addHandler(handler)
        site_log.setLevel(logging.INFO)
        site_log.propagate = False
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    runtime_port = free_port()
    busy, refused = threading.Event(), []

    def on_fatal(message: str) -> None:  # the ClientApp refused the handshake: this site stops once its refusal is sent
        refused.append(message)
        log.error("%s", message)
        _later(REFUSAL_WAIT, stopping.set)

    worker: threading.Thread | None = None
    error: FedloraError | None = None
    backoff, deadline = 1.0, time.monotonic() + opts.connect_timeout
    mode = "INSECURE (no TLS, no site authentication)" if opts.insecure else "TLS, site key " + str(opts.key)
    say(f"fedlora client: site {opts.name} (cohort {opts.domain}) connecting to {opts.server}, {mode}")
    if not opts.insecure and opts.cert is None:
        say(f"fedlora client: WARNING: no site certificate ({opts.key.with_suffix('.crt') if opts.key else '--cert'} not found): "
            "this site's secure-aggregation keys go unsigned and its peers' unchecked, so the coordinator could substitute them; "
            "ask the operator for <site>.crt (fedlora certs --sign-requests <site>.csr, from fedlora keygen)")
    try:
        with (opts.state_dir / "supernode.log").open("a") as log_file:
            while not stopping.is_set():
                node = SuperNode(opts, runtime_port, log_file, deadline - time.monotonic())
                node.on_sent = lambda: _later(REFUSAL_LINGER, stopping.set) if refused else None  # a refusal sent: the site stops
                if worker is None:
                    try:
                        wait_for_port("127.0.0.1", runtime_port, 60, node.proc, lambda: "")
                    except DeploymentError:
                        pass  # the SuperNode died before serving: the loop below reports why and retries
                    worker = _start_worker(opts, runtime_port, stopping, busy, on_fatal)
                threading.Thread(target=_announce, args=(node, stopping, say, f"fedlora client: {opts.name} connected; waiting for work"),
                                 daemon=True).start()
                code = node.wait(stopping, busy)
                if stopping.is_set():
                    break
                if node.connected.is_set():  # it was in: the coordinator went away; a fresh window to reconnect
                    backoff, deadline = 1.0, time.monotonic() + opts.connect_timeout
                reason = node.reason or f"the SuperNode exited with status {code} (see {opts.state_dir / 'supernode.log'})"
                if node.fatal:
                    raise DeploymentError(f"site {opts.name} cannot join the coordinator at {opts.server}: {reason}")
                if time.monotonic() + backoff > deadline:
                    raise DeploymentError(f"site {opts.name} could not join the coordinator at {opts.server} within "
                                          f"{opts.connect_timeout:.0f} s: {reason}")
                say(f"fedlora client: {reason}; retrying in {backoff:.0f} s")
                stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)
    except FedloraError as e:
        error = e
    finally:
        stopping.set()  # the worker ends between two messages
        if worker is not None:
            worker.join(WORKER_GRACE)
    if refused and error is None:
        error = DataError(refused[0])
    running = worker is not None and worker.is_alive()
    if running and busy.is_set():
        say(f"fedlora client: site {opts.name} stopped in the middle of a message: its work on it is dropped and nothing of it "
            f"was sent; every charge to its privacy budget is recorded ({opts.state_dir / 'privacy.json'})")
    if error is None:
        say(f"fedlora client: site {opts.name} stopped")
    if running and hard_exit:  # the interpreter must not tear torch down under the running worker
        if error is not None:
            print(f"fedlora: error: {error}", file=sys.stderr)
        _exit_now(error.exit_code if error is not None else 0)
    if error is not None:
        raise error


def _announce(node: SuperNode, stopping: threading.Event, say, text: str) -> None:
    while node.proc.poll() is None and not stopping.is_set():
        if node.connected.wait(0.5):
            say(text)
            return
