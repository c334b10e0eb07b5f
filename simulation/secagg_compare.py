"""Ours and Flower's legacy SecAgg+ side by side, on the same inputs, in one process.

Each site holds a fixed update (a float vector) and an example count; both protocols compute
the example-weighted mean of the updates over an in-process grid (``LocalGrid``), and a meter
around the ClientApp records, per site, the CPU time spent in the protocol (thread time of
each handler call; the sites' "training" is a lookup) and the content bytes down and up
(``fedlora.records.content_bytes``: arrays, bytes and strings, not transport framing). What is
left of the run's thread time is the coordinator's. Dropouts are simulated by a site that
stops answering at the masked-input stage (after it shared its keys), which is where
recovering it costs the coordinator most.

Flower's side is ``flwr.server.workflow.SecAggPlusWorkflow`` with ``flwr.client.mod.
secaggplus_mod`` driven directly (a ``LegacyContext`` with FedAvg), configured with the same
neighbours, threshold, clip range and quantisation levels as ours. Used by the cross-check test
and by ``bench/secagg.py``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlora.client import secagg_site
from fedlora.config import SecureAggregationConfig
from fedlora.records import content_bytes
from fedlora.privacy.key_signing import InMemoryCA
from fedlora.server.secure_round import SecureAggregation, advertised_keys, plan
from fedlora.privacy.secagg_vector import read_sum
from fedlora.protocol import SecAggKeys, SecAggSetup, read

from .local_grid import LocalGrid

Drop = Callable[[Message], bool]  # does the site vanish before answering this message?


@dataclass
class Outcome:
    """One protocol run: the weighted mean it produced and what it cost."""

    mean: np.ndarray | None  # None: the round aborted
    sites: int
    site_cpu: dict[int, float] = field(default_factory=lambda: defaultdict(float))  # node -> seconds
    bytes_down: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    bytes_up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    total_cpu: float = 0.0

    @property
    def coordinator_cpu(self) -> float:
        return self.total_cpu - sum(self.site_cpu.values())

    def per_site(self, what: dict[int, float] | dict[int, int]) -> float:
        """Mean over the sites that took part (those that vanished included)."""
        return float(sum(what.values()) / self.sites)


class _Meter:
    """Wraps a ClientApp: thread time and content bytes per node; simulated dropouts."""

    def __init__(self, app: ClientApp, outcome: Outcome, drop: Drop | None) -> None:
        self.app, self.out, self.drop, self.gone = app, outcome, drop, set()

    def __call__(self, msg: Message, ctx: Context) -> Message:
        node = ctx.node_id
        msg.content = copy.deepcopy(msg.content)  # as a real transport: each site its own copy (Flower's mod edits it)
        self.out.bytes_down[node] += content_bytes(msg.content)
        if node in self.gone or (self.drop is not None and self.drop(msg)):
            self.gone.add(node)
            return Message(Error(code=1, reason="site vanished"), reply_to=msg)
        t0 = time.thread_time()
        reply = self.app(msg, ctx)
        self.out.site_cpu[node] += time.thread_time() - t0
        if not reply.has_error():
            self.out.bytes_up[node] += content_bytes(reply.content)
        return reply


WEIGHT_CAP = 1000.0  # federation.weight_cap's default: both sides weigh min(n, cap) / cap


def _dropper(fraction: float, n: int, is_masked_stage: Callable[[Message], bool]) -> Drop | None:
    """The first ``round(fraction n)`` partitions vanish at the masked-input stage."""
    k = round(fraction * n)
    if k == 0:
        return None
    gone = set(range(1001, 1001 + k))  # LocalGrid's node ids for partitions 0 .. k-1
    return lambda msg: msg.metadata.dst_node_id in gone and is_masked_stage(msg)


def run_ours(updates: Sequence[np.ndarray], examples: Sequence[int], cfg: SecureAggregationConfig, *,
             dropout: float = 0.0, seed: int = 0, signed: bool = True) -> Outcome:
    """fedlora's SecAgg+ (``fedlora.server.secure_round`` + ``fedlora.client.secagg_site``).
    ``signed``: as deployed, each site signs its keys and the survivor set with a certificate of
    one in-memory CA and checks its peers' (made before the clock starts: a federation's
    certificates are issued once, not per round); False: unauthenticated keys, no consistency check."""
    app = ClientApp()
    ca = InMemoryCA() if signed else None
    creds = {i: ca.credentials(f"site-{i}") for i in range(len(updates))} if ca is not None else {}

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        i = int(ctx.node_config["partition-id"])
        setup = read(SecAggSetup, msg.content, "train")
        vector = secagg_site.train_vector(setup, {"x": updates[i]}, int(examples[i]), 0.0)
        return Message(secagg_site.begin(ctx, setup, vector, sum_of=secagg_site.SumOf("bench", 1, "train"), credentials=creds.get(i)),
                       reply_to=msg)

    for stage in (secagg_site.share, secagg_site.masked, secagg_site.unmask):
        app.train(f"secagg_{stage.__name__}")(lambda msg, ctx, stage=stage: Message(stage(ctx, msg.content), reply_to=msg))
    app.train("secagg_check")(lambda msg, ctx: Message(secagg_site.check(ctx, msg.content, credentials=creds.get(
        int(ctx.node_config["partition-id"]))), reply_to=msg))

    n = len(updates)
    out = Outcome(None, n)
    grid = LocalGrid(_Meter(app, out, _dropper(dropout, n, lambda m: m.metadata.message_type == "train.secagg_masked")), n)
    t0 = time.thread_time()
    sa = SecureAggregation(cfg, seed, WEIGHT_CAP)
    nodes = sorted(grid.get_node_ids())
    setups = sa.site_config("bench", nodes, 1)

    def exchange(messages: list[Message]) -> dict[int, Message]:
        return {r.metadata.src_node_id: r for r in grid.send_and_receive(messages)}

    replies = exchange([Message(RecordDict({"secagg": ConfigRecord(setups[node])}), node, "train", group_id="1") for node in nodes])
    advertised = {u: advertised_keys(read(SecAggKeys, r.content, "train")) for u, r in replies.items() if not r.has_error()}
    try:
        total, _, q = sa.secure_sum(exchange, "bench", 1, advertised)
        out.mean = read_sum(total, {"x": np.shape(updates[0])}, q).mean_delta["x"]
    except Exception as e:  # an abort: no sum
        logging.getLogger("fedlora.simulation").warning("our SecAgg+ aborted: %s", e)
    out.total_cpu = time.thread_time() - t0
    return out


def run_flower(updates: Sequence[np.ndarray], examples: Sequence[int], cfg: SecureAggregationConfig, *,
               dropout: float = 0.0) -> Outcome:
    """Flower's legacy SecAgg+ with the same neighbours (``num_shares = k + 1``), threshold,
    clip range and quantisation levels (``2^bits``); its modulus stays at its default 2^32."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD

    class Site(NumPyClient):
        def __init__(self, i: int) -> None:
            self.i = i

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return [np.asarray(updates[self.i], dtype=np.float32)], int(examples[self.i]), {}

    app = ClientApp(client_fn=lambda ctx: Site(int(ctx.node_config["partition-id"])).to_client(), mods=[secaggplus_mod])

    def masked_stage(msg: Message) -> bool:
        rec = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        return rec is not None and rec.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS

    n = len(updates)
    out = Outcome(None, n)
    grid = LocalGrid(_Meter(app, out, _dropper(dropout, n, masked_stage)), n)
    k, t, _ = plan(cfg, n)
    t0 = time.thread_time()
    manager = SimpleClientManager()
    for node in sorted(grid.get_node_ids()):
        manager.register(GridClientProxy(node, grid, grid.run.run_id))
    ctx = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}), ServerConfig(num_rounds=1),
                        FedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n), manager)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": 1})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(ndarrays_to_parameters([np.zeros(1, np.float32)]), True)
    workflow = SecAggPlusWorkflow(num_shares=k + 1 if k + 1 < n else n, reconstruction_threshold=t, clipping_range=cfg.clip_range,
                                  quantization_range=2**cfg.bits, max_weight=WEIGHT_CAP)
    workflow(grid, ctx)
    result = parameters_to_ndarrays(compat.arrayrecord_to_parameters(ctx.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
    out.mean = result[0] if result[0].shape == np.shape(updates[0]) else None  # unchanged: the round did not complete
    out.total_cpu = time.thread_time() - t0
    return out
