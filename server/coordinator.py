"""The coordinator's round loop, written against Flower's ``Grid`` (Message API).

One run:

1. wait for the expected sites, ask each (``query``) for its name and cohort;
2. per cohort, start from the initial adapter (a pure function of seed and cohort);
3. each round: send every sampled site its cohort's global adapter (``train``), check every
   reply, aggregate each cohort's updates with the strategy (secure cohorts: only their sum,
   ``secure_round``), then send the new adapter (``evaluate``, every ``train.eval_every``
   rounds and after the last) and combine the eval metrics (``evaluation``); append one line
   to ``metrics.jsonl`` (line ``round = 0`` evaluates the initial adapter) and checkpoint;
4. save each cohort's adapter in PEFT format and write ``summary.json`` (``run_summary``).

A site that fails or sends a bad update is logged and left out of that round's aggregate;
a round in which every site of a cohort failed stops the run with a FederationError.

Fail closed: with secure aggregation on, a cohort with fewer than ``secure_aggregation.min_sites``
sites at discovery is skipped for the run (its sites are sent nothing; ``"skipped"`` in every
metrics line, ``cohorts_skipped`` in ``summary.json``), unless ``secure_aggregation.allow_clear``
aggregates it in the clear; if every cohort would be skipped the run stops before any round.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from tqdm import tqdm

from fedlora.config import RunConfig
from fedlora.errors import (BUDGET_EXHAUSTED_CODE, DATA_MISMATCH_CODE, POLICY_REFUSED_CODE, UNKNOWN_COHORT_CODE, FederationError,
                            FedloraError)
from fedlora.model import ModelSpec, derive_seed, get_runtime
from fedlora.protocol import (AdapterRef, ClientDpAsk, CohortsOffer, HelloAsk, PrivacyAsk, RoundPlan, SecAggKeys, SiteInfo, TrainMetrics, arrays, read, read_event,
                              record_of)
from fedlora.records import adapter_digest, content_bytes, from_record, to_record
from fedlora.privacy.events import ClientDpEvent, DpSgdEvent, EvalNoiseEvent, event_from_dict
from fedlora.privacy import key_signing
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.secagg import SecAggAbort
from fedlora.privacy.secagg_vector import read_sum, train_length
from fedlora.strategies import SiteUpdate
from fedlora.tasks import get_task

from .aggregation import Aggregation, Release
from .checkpoint import Checkpoint
from .cohort import Cohort, RoundReplies, failed_entry, train_metrics_problem, weighted
from .exchange import send_and_receive
from .evaluation import NO_METRICS, clear_metrics, secure_metrics
from .client_dp import ClientLevelDp
from .rundir import RunDir
from .advice import with_warnings
from .run_state import RunState
from .run_summary import all_skipped_message, cohort_summary, partition_summary, privacy_summary
from .secure_round import SecureAggregation, advertised_keys, too_small
from .secure_round import validate as validate_secure_aggregation

log = logging.getLogger("fedlora.server")
# what the coordinator says of a site that refused to join (only the code comes from the site's data)
_JOIN_REFUSALS = {DATA_MISMATCH_CODE: "its data does not fit its cohort's labels; it stopped at its side (details in its own log)",
                  UNKNOWN_COHORT_CODE: "its cohort (--domain) is not one of this run's; it was told so and stopped"}


def node_roster(grid: Grid) -> Mapping[int, tuple[str, str]] | None:
    """Node id -> (site name, cohort) where the engine names its nodes itself, else None (the sites
    are asked, ``query``). Only the in-process engine's lazy population has one (``LocalGrid.roster``):
    the harness made and numbered every virtual site, as a SuperLink with SuperNode authentication
    names each node by its registered key, so a site's name comes from the engine, never from the
    site; each still proves it to its peers by signing its secure-aggregation keys with its certificate.
    Looks through grids that wrap another (``inner``)."""
    while grid is not None:
        roster = getattr(grid, "roster", None)
        if roster is not None:
            return roster
        grid = getattr(grid, "inner", None)
    return None


def _by_site(sent: list[Message], replies: list[Message]) -> dict[int, Message]:
    """Replies keyed by the node each answers for: the destination of the message it replies to
    (an error the SuperLink writes in a node's place, "Node Unavailable", comes from the
    SuperLink's own node id), else its sender."""
    to = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    return {to.get(r.metadata.reply_to_message_id or "", r.metadata.src_node_id): r for r in replies}


def _some(names: list[str], shown: int = 12) -> str:
    """Names for a log line: all of a few, the first ``shown`` and how many of a large population."""
    if not names:
        return "none"
    return ", ".join(names) if len(names) <= shown else f"{', '.join(names[:shown])}, ... ({len(names)} sites)"


class Coordinator:
    def __init__(self, cfg: RunConfig, run_dir: RunDir, labels: dict[str, list[str]], *, expected_sites: int,
                 progress: bool = True, wait_timeout: float = 120.0, round_timeout: float | None = None,
                 resume: Checkpoint | None = None, registered: dict[int, str] | None = None, ca_pem: str = "",
                 engine: str | None = None) -> None:
        self.cfg, self.run_dir, self.progress, self.resume = cfg, run_dir, progress, resume
        self.engine = engine or cfg.federation.engine  # "deployment" under fedlora server, else the simulation engine
        self.registered = registered or {}  # node id -> site name of the sites allowed to join (deployment)
        self.ca_pem = ca_pem  # the federation CA (public): with it, a site is named by its certificate, never by what it says
        self.spec = ModelSpec.from_config(cfg)
        self.task = get_task(cfg.task.kind)  # what the cohorts' metrics mean (``fedlora.tasks``)
        self.strategy = cfg.federation.build_strategy()
        # everything carried across rounds (checkpointed): cohorts, counters, RNG (site sampling, client-level noise), ledger
        self.state = RunState({c.name: Cohort(c.name, list(labels[c.name])) for c in cfg.cohorts},
                              np.random.default_rng(derive_seed(cfg.seed, "coordinator")))
        self.cohorts, self.rng = self.state.cohorts, self.state.rng  # the same objects, for short names
        self.aggregation = Aggregation(self.strategy, cfg.federation.weight_cap)  # client-level DP joins once sizes are known
        self.expected_sites, self.wait_timeout, self.round_timeout = expected_sites, wait_timeout, round_timeout
        self.secagg = (SecureAggregation(cfg.secure_aggregation, cfg.seed, cfg.federation.weight_cap)
                       if cfg.secure_aggregation.enabled else None)
        self.skipped: dict[str, str] = {}  # cohort -> why it is skipped for the run (fail closed: too few sites for SecAgg)
        self.seen: set[int] = set()  # every node asked who it is (discovery, _rejoin): each is asked once
        self.adapters = self.state.adapters  # no adapter sent to a site that holds it

    # ---- messaging -------------------------------------------------------------------
    def _exchange(self, grid: Grid, messages: list[Message], timeout: float | None = None) -> dict[int, Message]:
        """Send, wait for the replies (at most ``timeout`` seconds, default the round timeout),
        and count every message's content bytes as downloaded and every reply's as uploaded.
        A site the grid no longer lists as online is not waited for (it counts as no reply)."""
        online = set(grid.get_node_ids())
        gone = [m for m in messages if m.metadata.dst_node_id not in online]
        messages = [m for m in messages if m.metadata.dst_node_id in online]
        timeout = self.round_timeout if timeout is None else timeout
        self.state.bytes_down += sum(content_bytes(m.content) for m in messages)
        out = _by_site(messages, send_and_receive(grid, messages, timeout=timeout))
        again = self.adapters.resend(messages, out)  # sites that no longer hold the adapter a message named: in full
        if again:
            log.info("%d site(s) did not hold the adapter named by digest; sent it in full", len(again))
            self.state.bytes_down += sum(content_bytes(m.content) for m in again)
            out.update(_by_site(again, send_and_receive(grid, again, timeout=timeout)))
        self.adapters.acknowledge(messages + again, out)
        self.state.bytes_up += sum(content_bytes(r.content) for r in out.values() if not r.has_error())
        for m in gone:
            log.warning("node %s is offline; left out of %s", m.metadata.dst_node_id, m.metadata.message_type)
        for m in messages:
            if m.metadata.dst_node_id not in out:
                log.warning("no reply from node %s (%s) within the timeout", m.metadata.dst_node_id, m.metadata.message_type)
        return out

    def _connected(self, nodes: list[int]) -> str:
        """Who is connected and who is missing, by site name where the sites are registered."""
        if not self.registered:
            return f"{len(nodes)} of {self.expected_sites} site(s) connected"
        here = sorted(self.registered.get(n, f"unregistered node {n}") for n in nodes)
        missing = sorted(name for node, name in self.registered.items() if node not in nodes)
        return (f"{len(nodes)} of {self.expected_sites} site(s) connected ({', '.join(here) or 'none'})"
                + (f"; not connected: {', '.join(missing)}" if missing else ""))

    def _wait_for_nodes(self, grid: Grid, say_every: float = 10.0) -> list[int]:
        """Wait until ``expected_sites`` are connected, saying who is and who is missing every
        ``say_every`` seconds; ``FederationError`` naming the missing ones at ``wait_timeout``."""
        start = time.monotonic()
        deadline, said = start + self.wait_timeout, start
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.expected_sites:
                return nodes
            now = time.monotonic()
            if now > deadline:
                raise FederationError(f"not enough sites within {self.wait_timeout:.0f} s: {self._connected(nodes)}")
            if now - said >= say_every:
                log.info("waiting for sites (%.0f of %.0f s): %s", now - start, self.wait_timeout, self._connected(nodes))
                said = now
            time.sleep(0.5)

    def _identify(self, node: int, info: SiteInfo, challenge: bytes) -> str:
        """A joining site's name, from what authenticates it, never from what it says: with the
        federation CA, the name its certificate certifies (its signature over this query's fresh
        challenge must verify; ``key_signing.verify_hello``); in deployment, the name its
        SuperNode key was registered under, which the certificate must agree with. A node that
        is not registered (when sites are) or not authenticated (when the CA is known) is refused
        (``FedloraError`` naming it and why)."""
        name = info.name
        if self.ca_pem:
            try:
                name = key_signing.verify_hello(info.cert, info.sig, self.ca_pem, challenge, info.cohort)
            except key_signing.KeyAuthError as e:
                raise FedloraError(f"node {node} (calling itself {info.name!r}) is not authenticated: {e}") from None
            if name != info.name:
                log.warning("node %s calls itself %r but its certificate names it %r; it is named by its certificate", node, info.name, name)
        if self.registered:
            if node not in self.registered:
                raise FedloraError(f"node {node} (calling itself {info.name!r}) is not among the registered site keys")
            if self.ca_pem and self.registered[node] != name:
                raise FedloraError(f"node {node} is registered as {self.registered[node]} but its certificate names {name!r}")
            if name != self.registered[node]:
                log.warning("node %s is registered as %s but calls itself %r; it is named by its key: %s", node, self.registered[node],
                            name, self.registered[node])
            name = self.registered[node]
        return name

    def _hello(self, node: int, challenge: bytes) -> Message:
        """The handshake (``query``): the base model, a fresh challenge for the site to sign, the
        run's cohorts and their labels."""
        offer = CohortsOffer(names=tuple(self.cohorts), labels=tuple(json.dumps(c.labels) for c in self.cohorts.values()))
        return Message(RecordDict({"config": ConfigRecord(self.spec.to_flat()), HelloAsk.record: record_of(HelloAsk(challenge=challenge)),
                                   CohortsOffer.record: record_of(offer)}), node, "query", group_id="0")

    def _discover(self, grid: Grid) -> None:
        nodes = self._wait_for_nodes(grid)
        log.info("%s", self._connected(nodes))
        self.seen |= set(nodes)
        roster = node_roster(grid)
        if roster is not None:  # a lazy simulated population: the engine names its nodes, nobody is asked (``node_roster``)
            for node in nodes:
                name, cohort = roster[node]
                if cohort in self.cohorts:
                    self.cohorts[cohort].nodes[node] = name
        challenges = {} if roster is not None else {node: os.urandom(32) for node in nodes}
        replies = self._exchange(grid, [self._hello(node, challenges[node]) for node in challenges])
        refused: dict[str, str] = {}
        for node, reply in sorted(replies.items()):
            if reply.has_error():
                who = self.registered.get(node, f"node {node}")
                why = _JOIN_REFUSALS.get(reply.error.code, "")
                refused[who] = why or reply.error.reason
                log.warning("%s did not join: %s", who, why or reply.error.reason)
                continue
            try:
                info = read(SiteInfo, reply.content, "query")
                name = self._identify(node, info, challenges[node])
            except FedloraError as e:
                log.warning("node %s did not join: %s", node, e)
                continue
            cohort = info.cohort
            if cohort not in self.cohorts:
                log.warning("site %s belongs to cohort %r, which this run does not train; ignoring it", name, cohort)
                continue
            if any(name in c.nodes.values() for c in self.cohorts.values()):
                log.warning("node %s calls itself %s, a name another site already holds; refused", node, name)
                continue
            self.cohorts[cohort].nodes[node] = name
        joined = "; ".join(f"{c.name}: {_some(sorted(c.nodes.values()))}" for c in self.cohorts.values())
        log.info("joined: %s%s", joined, f"; did not join: {', '.join(sorted(refused))}" if refused else "")
        empty = [c for c, co in self.cohorts.items() if not co.nodes]
        if empty:
            raise FederationError(f"no site joined cohort(s) {', '.join(empty)}")

    def _rejoin(self, grid: Grid, round_: int) -> None:
        """Take back a site of this run that reconnected under a new node id: its process
        restarted, and without SuperNode authentication Flower gives a restarted SuperNode a new
        id (with it, the id is the registered key's, and the site is simply online again). Every
        node not asked before is asked who it is, as at discovery (``_identify``: by its certificate
        or registered key where there are those); a site of the run whose old node is offline takes
        its place in its cohort from this round on. Nobody else joins mid-run: a cohort's sites are
        fixed at discovery (secure aggregation, client-level DP and the sampling rest on them)."""
        online = set(grid.get_node_ids())
        new = sorted(online - self.seen)
        if not new:
            return
        self.seen |= set(new)
        challenges = {node: os.urandom(32) for node in new}
        replies = self._exchange(grid, [self._hello(node, challenges[node]) for node in new])
        for node, reply in sorted(replies.items()):
            try:
                if reply.has_error():
                    raise FedloraError(_JOIN_REFUSALS.get(reply.error.code, "") or reply.error.reason)
                info = read(SiteInfo, reply.content, "query")
                name = self._identify(node, info, challenges[node])
            except FedloraError as e:
                log.warning("round %d: node %s did not rejoin: %s", round_, node, e)
                continue
            cohort = self.cohorts.get(info.cohort)
            old = next((n for n, s in cohort.nodes.items() if s == name), None) if cohort is not None else None
            if cohort is None or old is None:
                log.warning("round %d: site %s (cohort %r) connected after the run started; a run's sites are those that joined "
                            "at its start (or at fedlora server --resume)", round_, name, info.cohort)
            elif old in online:
                log.warning("round %d: node %s calls itself %s, a name a connected site holds; refused", round_, node, name)
            else:
                cohort.nodes = {(node if n == old else n): s for n, s in cohort.nodes.items()}
                log.info("round %d: site %s rejoined (restarted: node %s, before %s)", round_, name, node, old)

    def _content(self, cohort: Cohort, round_: int, extra: ClientDpAsk | None = None) -> RecordDict:
        t, p = self.cfg.train, self.cfg.privacy
        plan = RoundPlan(round=round_, cohort=cohort.name, labels=tuple(cohort.labels), seed=self.cfg.seed,
                         wire_dtype=self.cfg.federation.wire_dtype, local_steps=t.local_steps, local_epochs=float(t.local_epochs),
                         batch_size=t.batch_size, optimizer=t.optimizer, learning_rate=float(t.learning_rate),
                         weight_decay=float(t.weight_decay), max_grad_norm=float(t.max_grad_norm), eval_fraction=float(t.eval_fraction),
                         rounds=t.rounds, eval_every=t.eval_every, momentum=float(t.momentum), max_local_steps=t.max_local_steps,
                         proximal_mu=float(self.strategy.site_options().get("proximal_mu", 0.0)))
        ask = PrivacyAsk(dp=p.dp, epsilon=float(p.epsilon), delta=float(p.delta), max_grad_norm=float(p.max_grad_norm),
                         noise_multiplier=float(p.noise_multiplier), accountant=p.accountant, grad_sample_mode=p.grad_sample_mode,
                         eval_metrics=p.eval_metrics)
        config = record_of(plan, ask, *([extra] if extra is not None else []))
        config.update(self.spec.to_flat())
        record, _ = to_record(cohort.state, self.cfg.federation.wire_dtype)
        digest = adapter_digest(record)
        self.adapters.remember(digest, record)
        return RecordDict({"adapter": record, "config": config, AdapterRef.record: record_of(AdapterRef(digest=digest))})

    def _sample(self, cohort: Cohort, q: float | None = None) -> list[int]:
        """Poisson sampling of a cohort's sites (in name order): each independently with probability
        ``q`` (default ``federation.site_sample_rate``), drawn from the coordinator's RNG (checkpointed:
        a resumed run draws what the uninterrupted one drew); q = 1 draws nothing."""
        nodes = sorted(cohort.nodes, key=lambda n: cohort.nodes[n])
        q = self.cfg.federation.site_sample_rate if q is None else q
        if q >= 1:
            return nodes
        keep = self.rng.random(len(nodes)) < q
        return [n for n, k in zip(nodes, keep) if k]

    def _secure_metrics(self, cohort: Cohort) -> bool:
        """Whether this cohort's eval metrics are summed securely (else clear, or not asked for)."""
        return cohort.secure and self.cfg.secure_aggregation.metrics == "secure"

    def _broadcast(self, kind: str, round_: int) -> list[Message]:
        """One message per site; ``train`` goes only to the sampled sites of cohorts still training,
        ``evaluate`` to a sample of its own (``federation.eval_sample_rate``; 1: every site), and
        skips secure cohorts whose metrics are not to be sent. Under secure aggregation the sampled
        sites are the sum's group; a sample below its minimum sits the sum out (``SecureAggregation.setup``).
        A cohort skipped for the run (``skipped``) is sent nothing."""
        messages = []
        self.adapters.records.clear()  # only this exchange's adapters may need resending
        for cohort in (c for c in self.cohorts.values() if c.name not in self.skipped and (c.active or kind != "train")):
            nodes = list(cohort.nodes)
            extra, secure = None, None
            if kind == "train":
                nodes = cohort.selected = self._sample(cohort)
                if self.state.client_dp is not None:
                    extra = ClientDpAsk.read(self.state.client_dp.site_config(cohort.name, max(1, len(nodes))), "train")
                if cohort.secure and self.secagg is not None and nodes:
                    secure = self.secagg.setup(cohort.name, nodes, round_, kind)
                    if secure is None:
                        nodes = cohort.selected = []
            elif cohort.secure and self.cfg.secure_aggregation.metrics == "none":
                continue
            elif self.cfg.federation.eval_sample_rate < 1:
                nodes = self._sample(cohort, self.cfg.federation.eval_sample_rate)
            if kind != "train" and self._secure_metrics(cohort) and self.secagg is not None:
                secure = self.secagg.setup(cohort.name, nodes, round_, kind)
                if secure is None:
                    continue
            content = self._content(cohort, round_, extra)
            for node in nodes:  # a site's own secure-aggregation setup beside the shared records
                own = content if secure is None else RecordDict({**content, "secagg": ConfigRecord(secure[node])})
                messages.append(Message(self.adapters.content_for(node, own), node, kind, group_id=str(round_)))
        return messages

    # ---- one round -------------------------------------------------------------------
    def _collect(self, cohort: Cohort, replies: dict[int, Message], round_: int) -> RoundReplies:
        """Check every sampled site's train reply; record privacy events; sort sites into
        trained, refused (budget spent) and failed (no reply, an error, or a bad payload)."""
        shapes = {k: v.shape for k, v in cohort.state.items()}
        out = RoundReplies()
        for node in cohort.selected:
            site, reply = cohort.nodes[node], replies.get(node)
            if reply is not None and reply.has_error() and reply.error.code == BUDGET_EXHAUSTED_CODE:
                log.info("round %d: %s", round_, reply.error.reason)
                out.refused.append(site)
                cohort.exhausted.add(site)
                continue
            if reply is not None and reply.has_error() and reply.error.code == POLICY_REFUSED_CODE:
                log.warning("round %d: site %s refused the round under its privacy policy: %s", round_, site, reply.error.reason)
                out.fail(site, f"refused under its privacy policy: {reply.error.reason}")
                out.policy_refused.append(site)
                continue
            if reply is None or reply.has_error():
                out.fail(site, "no reply" if reply is None else f"error reply: {reply.error.reason}")
                if reply is not None:
                    log.warning("round %d: %s", round_, reply.error.reason)
                continue
            try:
                if cohort.secure:
                    keys = read(SecAggKeys, reply.content, "train")
                    delta, m, unclipped = None, None, 0
                    advertised = advertised_keys(keys)
                else:
                    delta, _ = from_record(arrays(reply.content, "update", "train"), shapes)
                    m = read(TrainMetrics, reply.content, "train")
                    problem = train_metrics_problem(m)
                    if problem:
                        raise FedloraError(problem)
                    unclipped = int(m.update_unclipped or 0) if self.state.client_dp is not None else 0
                attested = self._attest(cohort, site, reply, round_, "train")
            except (FedloraError, KeyError, ValueError) as e:
                log.warning("round %d: rejected the update of site %s: %s", round_, site, e)
                out.fail(site, f"rejected: {e}")
                continue
            out.private |= attested
            if cohort.secure:  # the update stays masked at the site until the whole cohort's sum is unmasked
                out.advertised[node] = advertised
                continue
            out.updates.append(SiteUpdate(site=site, delta=delta, weight=float(m.num_examples)))
            if m.train_loss is not None:
                out.losses.append((m.train_loss, float(m.num_examples)))
            if m.train_seconds is not None:
                out.seconds.append(m.train_seconds)
            out.unclipped.append(unclipped)
        return out

    def _attest(self, cohort: Cohort, site: str, reply: Message, round_: int, kind: str) -> bool:
        """Check the privacy event a site attests and record it in the run's ledger; True if there
        was one. The run's ledger is what the sites attest: an event for another round, cohort or
        site, of the wrong kind, or one that puts the site above the budget it states, is refused
        (the reply is rejected and the site named). With ``privacy.dp`` on, a train reply without
        an event is refused too."""
        got = read_event(reply.content, kind)
        if got is None:
            if self.cfg.privacy.dp and kind == "train":
                raise FedloraError("it sent an update without a privacy event while DP is on")
            return False
        doc, status = got
        event = event_from_dict(doc)
        expected = DpSgdEvent if kind == "train" else EvalNoiseEvent
        if not isinstance(event, expected):
            raise FedloraError(f"its privacy event is of kind {event.kind!r}, expected {expected.kind!r} for {kind}")
        if event.round != round_ or event.cohort != cohort.name or event.site != site:
            raise FedloraError(f"its privacy event is for round {event.round}, cohort {event.cohort!r}, site {event.site!r}; "
                               f"expected round {round_}, cohort {cohort.name!r}, site {site!r} (forged or replayed event refused)")
        if not 0 < status.delta < 1 or not status.budget_epsilon > 0:
            raise FedloraError(f"it attests delta {status.delta} and budget {status.budget_epsilon}")
        trial = PrivacyLedger([*self.state.ledger.unit_events(site), event])
        spent = trial.spent(site, status.delta, event.accountant)
        if spent > status.budget_epsilon * (1 + 1e-6) + 1e-9:
            raise FedloraError(f"its privacy events add up to epsilon {spent:.4g}, above the budget {status.budget_epsilon:g} it states "
                               "(event refused)")
        self.state.ledger.record(event)
        self.state.ledger.declare(site, delta=status.delta, delta_rule=status.delta_rule, budget_epsilon=status.budget_epsilon,
                            unit="one record at one site", attested_by="site", noise=status.noise, public_size=status.public_size,
                            eval_metrics=status.eval_metrics)
        return True

    def _train_round(self, grid: Grid, round_: int, line: dict[str, Any]) -> None:
        before = self.state.bytes_up, self.state.bytes_down
        self._rejoin(grid, round_)  # a site that restarted (a new node id) trains again from this round
        replies = self._exchange(grid, self._broadcast("train", round_))
        for cohort in (c for c in self.cohorts.values() if c.active):
            got = self._collect(cohort, replies, round_)
            if not cohort.secure:  # every accepted clear update goes into the aggregate
                self.state.trained.update(u.site for u in got.updates)
            entry = line["cohorts"].setdefault(cohort.name, {})
            entry.update({"sites_refused_budget": got.refused, "sites_selected": len(cohort.selected), "sites_trained": len(got.updates),
                          "sites_failed": got.failed, "site_train_seconds": float(np.sum(got.seconds)) if got.seconds else None})
            if got.policy_refused:
                entry["sites_refused_policy"] = got.policy_refused
            if got.reasons:
                entry["sites_failed_reasons"] = dict(got.reasons)
            if cohort.secure:
                self._secure_aggregate(grid, cohort, got, round_, entry)
            elif got.updates or (self.state.client_dp is not None and not cohort.selected):
                # with client-level DP the noised mean is released even when Poisson sampling picked no site (noise only)
                self._step(cohort, round_, self.aggregation.from_updates(cohort, round_, got.updates, got.unclipped, self.rng), entry)
                entry["train_loss"] = weighted(got.losses)
            elif got.failed:
                raise FederationError(f"round {round_}: every site of cohort {cohort.name!r} failed "
                                      f"({', '.join(got.failed + got.refused)}); stopping")
            elif cohort.exhausted == set(cohort.nodes.values()):
                log.warning("round %d: every site of cohort %r has spent its privacy budget; the cohort stops training", round_, cohort.name)
                cohort.active = False
            # else: no site sampled, or the sampled ones refused while others still have budget
        line["bytes_up"], line["bytes_down"] = self.state.bytes_up - before[0], self.state.bytes_down - before[1]

    def _record_client_event(self, cohort: Cohort, event: ClientDpEvent) -> None:
        """A cohort's client-level DP release, with the delta and sampling it is accounted under."""
        assert self.state.client_dp is not None
        self.state.ledger.record(event)
        delta, rule = self.state.client_dp.delta(cohort.name)
        self.state.ledger.declare(f"cohort:{cohort.name}", delta=delta, delta_rule=rule, unit="one whole site",
                            sites=len(cohort.nodes), sampling=self.state.client_dp.sampling, adjacency="zero-out")

    def _secure_aggregate(self, grid: Grid, cohort: Cohort, got: RoundReplies, round_: int, entry: dict[str, Any]) -> None:
        """Stages 2-4 of secure aggregation for a cohort whose sites advertised keys; the
        coordinator sees only the cohort's sum. An abort leaves the adapter as it was."""
        assert self.secagg is not None
        entry["sites_trained"] = 0
        if not got.advertised:
            if got.failed:
                raise FederationError(f"round {round_}: every site of cohort {cohort.name!r} failed ({', '.join(got.failed)}); stopping")
            return
        shapes, failed = {k: v.shape for k, v in cohort.state.items()}, {}
        try:
            total, survivors, q = self.secagg.secure_sum(self._stage_exchange(grid), cohort.name, round_, got.advertised,
                                                         length=train_length(shapes), failed=failed)
            agg = read_sum(total, shapes, q, survivors=len(survivors))  # checks the sum's structure (ForgedSum)
            release = self.aggregation.from_secure_sum(cohort, round_, agg, self.rng)
        except (SecAggAbort, ValueError) as e:
            log.warning("round %d: secure aggregation of cohort %r aborted: %s", round_, cohort.name, e)
            entry["secure_aggregation_aborted"] = str(e)
            entry.update(failed_entry(cohort, got, failed))
            return
        entry.update(failed_entry(cohort, got, {u: "dropped out" for u in set(got.advertised) - set(survivors)} | failed))
        self.state.trained.update(cohort.nodes[u] for u in survivors if u in cohort.nodes)
        entry.update({"sites_trained": agg.sites, "values_clipped": agg.clipped,
                      "train_loss": None if got.private else agg.mean_loss, "site_train_seconds": None})
        self._step(cohort, round_, release, entry)

    def _step(self, cohort: Cohort, round_: int, release: Release, entry: dict[str, Any]) -> None:
        """The strategy's step on a cohort's release; its client-level DP event goes into the ledger."""
        if release.event is not None:
            self._record_client_event(cohort, release.event)
        entry.update(release.info)
        self.aggregation.step(cohort, round_, release)

    def _stage_exchange(self, grid: Grid):
        """How a secure-aggregation stage talks to the sites: the stage timeout bounds each wait."""
        return lambda msgs: self._exchange(grid, msgs, timeout=self.cfg.secure_aggregation.stage_timeout)

    def _evaluate_round(self, grid: Grid, round_: int, line: dict[str, Any]) -> None:
        before = self.state.bytes_up, self.state.bytes_down
        messages = self._broadcast("evaluate", round_)
        asked = {m.metadata.dst_node_id for m in messages}
        replies = self._exchange(grid, messages)
        failed: dict[str, dict[str, str]] = {c: {} for c in self.cohorts}  # cohort -> site -> why its evaluation is missing
        for cohort in self.cohorts.values():
            for node, site in cohort.nodes.items():
                reply = replies.get(node)
                if reply is None or reply.has_error():
                    if node in asked:
                        failed[cohort.name][site] = "no reply" if reply is None else f"error reply: {reply.error.reason}"
                    continue
                try:
                    self._attest(cohort, site, reply, round_, "evaluate")
                except (FedloraError, KeyError, ValueError) as e:
                    log.warning("round %d: rejected the eval metrics of site %s: %s", round_, site, e)
                    failed[cohort.name][site] = f"rejected: {e}"
                    del replies[node]
        for cohort in self.cohorts.values():
            entry = line["cohorts"].setdefault(cohort.name, {})
            if self.cfg.federation.eval_sample_rate < 1 and cohort.name not in self.skipped:
                entry["eval_sites_selected"] = len(asked & cohort.nodes.keys())
            if cohort.secure and self.cfg.secure_aggregation.metrics == "none":
                metrics = dict(NO_METRICS)
            elif (self._secure_metrics(cohort) and self.secagg is not None
                  and self.secagg.round_id(cohort.name, round_, "evaluate") in self.secagg.sat_out):
                metrics = dict(NO_METRICS)  # too few sites sampled: the cohort sat this eval sum out (``eval_skipped``)
            elif self._secure_metrics(cohort):
                assert self.secagg is not None
                metrics = secure_metrics(self.secagg, self._stage_exchange(grid), cohort, replies, round_,
                                         self.task.count_buckets(cohort.labels))
            else:
                metrics = clear_metrics(cohort, replies, round_, self.task.count_buckets(cohort.labels))
            entry.update(self.task.report(metrics, cohort.labels))
            if failed[cohort.name]:  # no reply, an error reply or a rejected event: named beside the metrics' own rejections
                reasons = failed[cohort.name] | entry.get("eval_sites_failed_reasons", {})
                entry["eval_sites_failed"], entry["eval_sites_failed_reasons"] = sorted(reasons), dict(sorted(reasons.items()))
        line["bytes_up"] += self.state.bytes_up - before[0]
        line["bytes_down"] += self.state.bytes_down - before[1]

    # ---- the run ---------------------------------------------------------------------
    def _name_skipped(self, line: dict[str, Any], round_: int) -> None:
        """Name in a metrics line every cohort skipped for the run (its entry is only the reason)
        and every secure cohort that sat this round's train (``skipped``) or eval
        (``eval_skipped``) sum out because too few of its sites were sampled."""
        for name, why in self.skipped.items():
            line["cohorts"][name] = {"skipped": why}
        if self.secagg is None:
            return
        for name, entry in line["cohorts"].items():
            for kind, key in (("train", "skipped"), ("evaluate", "eval_skipped")):
                why = self.secagg.sat_out.pop(self.secagg.round_id(name, round_, kind), None)
                if why is not None and name not in self.skipped:
                    entry[key] = why

    def run(self, grid: Grid) -> dict[str, Any]:
        start = time.perf_counter()
        bytes_before = self.state.bytes_up
        self._discover(grid)
        sizes = {c.name: len(c.nodes) for c in self.cohorts.values()}
        validate_secure_aggregation(self.cfg.secure_aggregation, sizes)
        self.skipped = too_small(self.cfg.secure_aggregation, sizes)
        if self.skipped and len(self.skipped) == len(self.cohorts):
            raise FederationError(all_skipped_message(self.skipped))
        for cohort in self.cohorts.values():
            cohort.secure = self.secagg is not None and len(cohort.nodes) >= self.cfg.secure_aggregation.min_sites
            if cohort.name in self.skipped:  # fail closed: nothing is sent to its sites, nothing of theirs aggregated
                cohort.active = False
                log.warning("cohort %r is SKIPPED for this run: its %d site(s) (%s) are fewer than secure_aggregation.min_sites = %d "
                            "and it is not aggregated in the clear; its sites are sent nothing (--allow-clear-aggregation, "
                            "secure_aggregation.allow_clear = true, aggregates it in the clear)", cohort.name, len(cohort.nodes),
                            ", ".join(sorted(cohort.nodes.values())), self.cfg.secure_aggregation.min_sites)
            elif self.secagg is not None and not cohort.secure:
                log.warning("cohort %r has %d site(s), fewer than secure_aggregation.min_sites = %d: --allow-clear-aggregation: its "
                            "updates and metrics are aggregated IN THE CLEAR, the coordinator sees every site's update", cohort.name,
                            len(cohort.nodes), self.cfg.secure_aggregation.min_sites)
        runtime = get_runtime(self.spec, self.cfg.model.device, self.cfg.model.dtype)
        if self.cfg.privacy.client_dp:
            self.state.client_dp = ClientLevelDp(self.cfg.privacy, self.cfg.federation.site_sample_rate,
                                                 {c.name: len(c.nodes) for c in self.cohorts.values()})
        self.aggregation.client_dp, self.aggregation.accountant = self.state.client_dp, self.cfg.privacy.accountant
        rounds = self.cfg.train.rounds
        if self.resume is not None:
            discovery = self.state.bytes_up - bytes_before
            for cohort in self.cohorts.values():
                self.aggregation.init_state(cohort)  # replaced by the checkpoint's arrays where the strategy keeps some
            done, initial, last = self.state.restore(self.resume)
            self.run_dir.truncate_metrics(done)
            self.state.bytes_up += discovery  # the new discovery's replies count too
            for name in self.skipped:
                self.cohorts[name].active = False
        else:
            for cohort in self.cohorts.values():
                cohort.state = runtime.initial_adapter(self.cfg.seed, cohort.name, len(cohort.labels))
                self.aggregation.init_state(cohort)
            self.run_dir.write_json("sites.json", {c.name: sorted(c.nodes.values()) for c in self.cohorts.values()})
            done, last = 0, {}
            # round 0 carries the sites' identification replies and the evaluation of the initial adapter
            initial = {"round": 0, "cohorts": {}, "bytes_up": self.state.bytes_up, "bytes_down": self.state.bytes_down}
            self._evaluate_round(grid, 0, initial)  # the starting adapter, so every run shows its improvement
            self._name_skipped(initial, 0)
            self.run_dir.append_metrics(initial)
        bar = tqdm(total=rounds, initial=done, desc="rounds", unit="round", disable=not self.progress, dynamic_ncols=True)
        try:
            for r in range(done + 1, rounds + 1):
                t0 = time.perf_counter()
                line: dict[str, Any] = {"round": r, "cohorts": {}}
                reused = self.adapters.not_resent
                self._train_round(grid, r, line)
                if r % self.cfg.train.eval_every == 0 or r == rounds:
                    self._evaluate_round(grid, r, line)
                line["adapters_not_resent"] = self.adapters.not_resent - reused  # messages that named a held adapter by digest
                self._name_skipped(line, r)
                line["seconds"] = time.perf_counter() - t0
                self.run_dir.append_metrics(line)
                if self.cfg.privacy.dp or self.cfg.privacy.client_dp or self.state.ledger.events:
                    self.state.ledger.save(self.run_dir.path / "privacy_ledger.json")
                last = line
                self.state.checkpoint(r, initial, last, secure=self.secagg is not None, seed=self.cfg.seed).save(self.run_dir)
                accuracy = {c: f"{v['accuracy']:.2f}" for c, v in line["cohorts"].items() if v.get("accuracy") is not None}
                if accuracy:
                    bar.set_postfix(accuracy)
                bar.update(1)
                if not self.progress:
                    log.info("round %d of %d done in %.1f s%s", r, rounds, line["seconds"],
                             "".join(f", {c} accuracy {a}" for c, a in accuracy.items()))
        finally:
            bar.close()
        for cohort in (c for c in self.cohorts.values() if c.name not in self.skipped):  # a skipped cohort trained nothing
            self.run_dir.write_dir(f"adapters/{cohort.name}",
                                   lambda d, c=cohort: runtime.save_peft(d, c.state, self.cfg.seed, c.name, c.labels))
        summary = {
            "rounds_completed": rounds,
            "resumed_after_round": self.resume.round if self.resume is not None else None,
            "sites": len(self.state.trained),  # sites whose update went into an aggregate (joined but never trained: not counted)
            "engine": self.engine,
            "seed": self.cfg.seed,
            "model": self.cfg.model.source,
            "task": self.cfg.task.kind,
            "lora_mode": self.cfg.lora.mode,
            "strategy": {"name": self.strategy.name, "options": self.strategy.options()},
            "wire_dtype": self.cfg.federation.wire_dtype,
            "partition": partition_summary(self.cfg),
            "bytes_up": self.state.bytes_up,
            "bytes_down": self.state.bytes_down,
            "wall_seconds": time.perf_counter() - start,
            "cohorts": {c.name: cohort_summary(c, initial, last, self.task.extra_metrics, self.skipped.get(c.name, ""))
                        for c in self.cohorts.values()},
            "cohorts_skipped": sorted(self.skipped),
        }
        for c in self.cohorts.values():  # the cohort's "sites" are those that joined; these, those that trained
            summary["cohorts"][c.name]["sites_trained"] = sorted(self.state.trained & set(c.nodes.values()))
        summary["privacy"] = privacy_summary(self.cfg.privacy, self.state.client_dp, self.state.ledger, self.cohorts)
        with_warnings(summary, dp=self.cfg.privacy.dp)
        self.run_dir.write_json("summary.json", summary)
        return summary
