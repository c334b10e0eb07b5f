"""A long-lived ClientApp executor for one SuperNode (Flower's ``--isolation process`` mode).

With Flower's default ``subprocess`` isolation the SuperNode starts a fresh ``flwr-clientapp``
process for every message: Python, torch and transformers are imported and the base model is
loaded again each time (about 7 s on 2 cores; a 1-round secure run took 140 s). Here one
process does what ``flwr-clientapp`` does, message after message, so the model, the tokenised
data and the site's caches stay warm:

1. ask the SuperNode's runtime API for a task (``AcquireTask``, as ``flower-superexec`` does);
2. with the task's token: pull the message and the context, call the site's own installed
   ClientApp, push the reply and the updated context (``TaskOutput``), with a task heartbeat
   running meanwhile (``flwr.supernode.runtime.run_clientapp`` does the same steps once).

The ClientApp is the one installed at the site (``fedlora.client.app``), never code from the
run's FAB: a site runs the code it trusts. A ClientApp exception becomes an error reply, so the
SuperNode (which waits for a reply to every message) never hangs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

log = logging.getLogger("fedlora.client")

ClientAppFn = Callable[..., Message]


def _client(address: str, component: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())


def run_task(address: str, token: str, app: ClientAppFn) -> str:
    """Execute one task: pull its message, run the ClientApp, push the reply; returns the message type."""
    client = _client(address, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        heartbeat.start()
        message, context, _run, _fab = pull_task_input(client)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as e:  # noqa: BLE001 - every failure must still answer the SuperNode
        log.exception("the ClientApp raised")
        details = f"{type(e).__name__}: {e}"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context, status, details)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    return message.metadata.message_type if message is not None else "?"


def serve(address: str, app: ClientAppFn, stop: threading.Event, *, poll: float = 0.05,
          busy: threading.Event | None = None) -> None:
    """Run tasks from the SuperNode's runtime API at ``address`` until ``stop`` is set, which
    is looked at between two tasks (a task under way runs to its end). ``busy`` is set while a
    task runs. While the SuperNode is away (restarting to reconnect), keep asking once a second."""
    busy = busy or threading.Event()
    while not stop.is_set():
        acquirer = _client(address, "SuperExec")
        try:
            while not stop.is_set():
                res = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                if res.HasField("task") and res.token:
                    busy.set()
                    try:
                        kind = run_task(address, res.token, app)
                    finally:
                        busy.clear()
                    log.debug("answered a %s message", kind)
                else:
                    stop.wait(poll)
        except Exception as e:  # noqa: BLE001 - the SuperNode restarts; so does the conversation
            log.debug("runtime API at %s unavailable (%s); retrying", address, e)
            stop.wait(1.0)
        finally:
            acquirer.close()
