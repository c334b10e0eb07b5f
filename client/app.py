"""The fedlora ClientApp (Flower Message API): what a data site does when asked.

Every record it reads or writes is declared in ``fedlora.protocol`` (message types, records,
keys, and which release each key a site sends is). In short:

* ``query``    <- the model spec, a challenge, the run's cohorts and labels; -> ``SiteInfo`` (name, cohort, and
               a signature over the challenge); a site holding another base model refuses, and so does one
               whose cohort the run does not train (code 4206) or whose data does not read with its cohort's
               labels (code 4205: the details stay in the site's log; ``fedlora client`` stops).
* ``train``    <- the cohort's global adapter, the public ``RoundPlan``, the coordinator's ``PrivacyAsk``
               (a request: the site applies the more private of it and its own ``SitePolicy``,
               ``fedlora.privacy.policy``) and ``ClientDpAsk``;
               -> the update and ``TrainMetrics``. Under DP: the site's public size instead of its
               exact count, no train loss, no timing, plus the round's privacy event and the site's
               ``PrivacyStatus``; a round past the budget is refused (code 4202), a request for
               less privacy than the policy allows too (code 4203), and nothing is released.
* ``evaluate`` <- the same; -> ``EvalMetrics``. Under DP the site's policy decides: ``site`` (default:
               the metrics stay in the site's log and state folder, the reply says so), ``noised``
               (Gaussian noise, charged to the ledger) or ``public`` (exact, outside the guarantee).
* secure aggregation (``SecAggSetup`` beside the config): ``train`` and ``evaluate`` reply with the
  site's public keys instead of the update or the metrics, which stay at the site, masked, until
  ``<kind>.secagg_share`` / ``_masked`` / ``_unmask`` (``fedlora.client.secagg_site``); the keys
  are signed with the site's key and checked against the federation CA (``SiteSpec.credentials``).
  A site whose policy requires secure aggregation (``SitePolicy.require_secure_aggregation``, the
  default) refuses (code 4203) a ``train`` without the setup, and an ``evaluate`` without it
  unless its metrics stay at the site, before reading data, training or charging any budget; a
  setup for a sum it already sent is refused before any work too (``refuse_replay_early``).

A problem at the site (bad data, wrong cohort, non-finite update) becomes an error reply
whose reason names it; the coordinator logs it and aggregates without that site.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.errors import (ADAPTER_NOT_HELD_CODE, BUDGET_EXHAUSTED_CODE, DATA_MISMATCH_CODE, POLICY_REFUSED_CODE, PROTOCOL_ERROR_CODE,
                            SITE_ERROR_CODE, UNKNOWN_COHORT_CODE, AdapterNotHeld, DataError, FedloraError, ProtocolError, UnknownCohort)
from fedlora.files import append_line
from fedlora.model import LoraRuntime, ModelSpec, get_runtime
from fedlora.privacy import eval_release, key_signing
from fedlora.privacy.policy import EffectivePrivacy, PolicyRefused, effective_privacy, refuse_clear
from fedlora.protocol import (ClientDpAsk, CohortsOffer, EvalKept, EvalMetrics, HelloAsk, PrivacyAsk, RoundPlan, SecAggSetup, SiteInfo, TrainMetrics, read,
                              record_of)
from fedlora.records import from_record, to_record
from fedlora.tasks import EncodedExamples

from .adapter_cache import adapter_for
from .data import split_train_eval
from . import secagg_site
from .privacy_site import BudgetExhausted, client_level_update, private_eval_noise, private_round
from .site import SiteSpec
from .trainer import LocalTrainSettings, evaluate_local, train_local

log = logging.getLogger("fedlora.client")


@dataclass(frozen=True)
class SiteData:
    train: EncodedExamples
    eval: EncodedExamples
    labels: tuple[str, ...]


DATA_CACHE_SITES = 1024  # sites whose tokenised data a process keeps (a simulation of many sites lets the oldest go)
_DATA_CACHE: OrderedDict[tuple, SiteData] = OrderedDict()


def site_data(site: SiteSpec, labels: Sequence[str], runtime: LoraRuntime, seed: int, eval_fraction: float) -> SiteData:
    """Load, validate, split and tokenise a site's data when it first works: its ``rows`` of the
    file (all rows when empty; the file itself is read once per process, ``load_labelled_texts``),
    or the rows a ``generated:`` path names. Kept for the last ``DATA_CACHE_SITES`` sites of the
    process; an older one is read again when it next works (same rows, same split)."""
    key = (site.name, site.cohort, site.data_path, site.columns, site.rows, runtime.spec.task,
           tuple(labels), str(runtime.path), runtime.spec.max_length, seed, eval_fraction)
    if key in _DATA_CACHE:
        _DATA_CACHE.move_to_end(key)
    else:
        data, label_list = runtime.task.read(site.data_path, site.columns, list(labels))
        if site.rows:
            beyond = [r for r in (min(site.rows), max(site.rows)) if not 0 <= r < len(data)]
            if beyond:
                raise DataError(f"{site.data_path}: site {site.name} is to read row index {beyond[0]}, but the file has "
                                f"{len(data)} data rows (did the file change since the sites were planned?)")
            data = data.subset(site.rows)
        train, held_out = split_train_eval(data, eval_fraction, seed, site.name)
        enc = runtime.task.encode
        tok, n = runtime.tokenizer, runtime.spec.max_length
        _DATA_CACHE[key] = SiteData(enc(tok, train, label_list, n), enc(tok, held_out, label_list, n), tuple(label_list))
        while len(_DATA_CACHE) > DATA_CACHE_SITES:
            _DATA_CACHE.popitem(last=False)
    return _DATA_CACHE[key]


def site_model(cfg: ConfigRecord, site: SiteSpec) -> ModelSpec:
    """The coordinator's model spec with this site's own copy of the base model (``site.model``,
    if the site names one) and the LoRA rank it trains (``site.lora_rank``, ``ModelSpec.at_rank``:
    the site's own choice, never told to the coordinator); refuses a copy whose name or hash differs
    from the coordinator's, and a rank the cohort's mode and rank do not allow."""
    spec = ModelSpec.from_flat(cfg)
    if site.model:
        spec = replace(spec, source=site.model)
    spec.check_base_model(spec.source)
    return spec.at_rank(site.lora_rank)


def _settings(plan: RoundPlan) -> LocalTrainSettings:
    return LocalTrainSettings(local_steps=plan.local_steps, local_epochs=plan.local_epochs, batch_size=plan.batch_size,
                              optimizer=plan.optimizer, learning_rate=plan.learning_rate, weight_decay=plan.weight_decay,
                              max_grad_norm=plan.max_grad_norm, momentum=plan.momentum, max_local_steps=plan.max_local_steps,
                              proximal_mu=plan.proximal_mu)


def _keep_metrics(site: SiteSpec, round_: int, res) -> None:
    """Policy ``eval_metrics = "site"``: the metrics go to the site's own log and state folder only."""
    log.info("site %s round %d: eval accuracy %.4f, loss %.4f on %d records (kept at this site)", site.name, round_, res.accuracy,
             res.loss, res.num_examples)
    if site.state_dir:
        append_line(Path(site.state_dir) / "eval_metrics.jsonl", json.dumps(
            {"round": round_, "cohort": site.cohort, "site": site.name, "eval_loss": res.loss, "accuracy": res.accuracy,
             "num_examples": res.num_examples, "label_counts": list(res.label_counts)}, sort_keys=True))


def make_client_app(sites: Sequence[SiteSpec] | None = None, *, device: str = "auto", dtype: str = "auto",
                    on_fatal: Callable[[str], None] | None = None) -> ClientApp:
    """A ClientApp. With ``sites`` (simulation) a node's site is ``sites[partition-id]``;
    without (deployment) it is read from the node config (``SiteSpec.from_node_config``).
    ``on_fatal(message)`` is called when the site cannot join at all (its cohort is not the
    run's, or its data does not fit the cohort's labels): ``fedlora client`` then stops."""
    app = ClientApp()
    table = sites  # a sequence by partition id; a large simulated population makes each SiteSpec when first asked for

    def resolve(ctx: Context) -> SiteSpec:
        if table is not None:
            return table[int(ctx.node_config["partition-id"])]
        return SiteSpec.from_node_config(ctx.node_config)

    def guarded(handler: Callable[[Message, Context, SiteSpec], RecordDict]) -> Callable[[Message, Context], Message]:
        def run(msg: Message, ctx: Context) -> Message:
            site = resolve(ctx)
            try:
                return Message(handler(msg, ctx, site), reply_to=msg)
            except FedloraError as e:
                budget = isinstance(e, BudgetExhausted)  # expected once a budget is spent: not an error
                kind = msg.metadata.message_type
                level = logging.INFO if isinstance(e, AdapterNotHeld) else logging.WARNING if budget else logging.ERROR
                log.log(level, "site %s refused %s: %s", site.name, kind, e)
                code = (BUDGET_EXHAUSTED_CODE if budget else POLICY_REFUSED_CODE if isinstance(e, PolicyRefused)
                        else PROTOCOL_ERROR_CODE if isinstance(e, ProtocolError) else DATA_MISMATCH_CODE if isinstance(e, DataError)
                        else UNKNOWN_COHORT_CODE if isinstance(e, UnknownCohort)
                        else ADAPTER_NOT_HELD_CODE if isinstance(e, AdapterNotHeld) else SITE_ERROR_CODE)
                # what a data error says (a row, a label, a path) stays in the site's own log
                reason = (f"site {site.name}: its data does not fit this cohort's plan (details in the site's own log)"
                          if isinstance(e, DataError) else f"site {site.name}: {e}")
                if kind == "query" and isinstance(e, (DataError, UnknownCohort)) and on_fatal is not None:
                    on_fatal(f"site {site.name} cannot join: {e}")  # the site stops at its side, with the full message
                return Message(Error(code=code, reason=reason), reply_to=msg)

        return run

    def prepare(msg: Message, site: SiteSpec) -> tuple[LoraRuntime, RoundPlan, EffectivePrivacy, SiteData, dict]:
        kind = msg.metadata.message_type
        plan = read(RoundPlan, msg.content, kind)
        if plan.cohort != site.cohort:
            raise FedloraError(f"asked to work for cohort {plan.cohort!r}, but this site belongs to {site.cohort!r}")
        eff = effective_privacy(site.policy, read(PrivacyAsk, msg.content, kind))  # refuses a request for less privacy
        runtime = get_runtime(site_model(msg.content["config"], site), site.device or device, dtype)
        data = site_data(site, list(plan.labels), runtime, plan.seed, plan.eval_fraction)
        state, _ = from_record(adapter_for(msg.content, kind), runtime.adapter_shapes(len(plan.labels)))
        return runtime, plan, eff, data, state

    def secagg_setup(msg: Message) -> SecAggSetup | None:
        return read(SecAggSetup, msg.content, msg.metadata.message_type) if "secagg" in msg.content else None

    def check_join(msg: Message, site: SiteSpec) -> None:
        """At the handshake, before joining: this site's cohort must be one the run trains, and
        its data must read with that cohort's labels (``CohortsOffer``). A mismatch stops the
        site at its side (``on_fatal``) with the full message in its own log; the coordinator
        is told only the error code and that the details stay here (``guarded``)."""
        if CohortsOffer.record not in msg.content:
            return
        offer = read(CohortsOffer, msg.content, "query")
        labels = offer.labels_of(site.cohort)
        if labels is None:
            raise UnknownCohort(f"this site's cohort (--domain) {site.cohort!r} is not one of this federation's cohorts "
                                f"({', '.join(offer.names) or 'none'}); the coordinator does not count it as joined")
        runtime = get_runtime(site_model(msg.content["config"], site), site.device or device, dtype)
        runtime.task.read(site.data_path, site.columns, list(labels))  # DataError naming file, row, column, label

    def query(msg: Message, ctx: Context, site: SiteSpec) -> RecordDict:
        if "config" in msg.content:  # the coordinator names its base model: refuse to join with another
            site_model(msg.content["config"], site)
            check_join(msg, site)
        info = SiteInfo(name=site.name, cohort=site.cohort)
        creds = site.credentials
        if HelloAsk.record in msg.content and creds is not None and creds.signs:  # prove the name with the site's certificate
            try:
                key, cert = key_signing.check_own(creds)
            except key_signing.KeyAuthError as e:
                raise FedloraError(f"cannot prove this site's name to the coordinator: {e}") from None
            challenge = read(HelloAsk, msg.content, "query").challenge
            info = replace(info, cert=key_signing.der(cert), sig=key_signing.sign_hello(key, challenge, site.name, site.cohort))
        return RecordDict({SiteInfo.record: record_of(info)})

    def before_work(msg: Message, ctx: Context, site: SiteSpec, setup: SecAggSetup | None) -> None:
        """Before any data is read, anything trained or any budget charged: with a setup, refuse a
        sum this site already sent (``secagg_site.refuse_replay_early``)."""
        if setup is not None:
            kind = msg.metadata.message_type
            round_ = read(RoundPlan, msg.content, kind).round
            secagg_site.refuse_replay_early(ctx, setup, secagg_site.SumOf(site.cohort, round_, kind), site.state_dir)

    def train(msg: Message, ctx: Context, site: SiteSpec) -> RecordDict:
        setup = secagg_setup(msg)
        if setup is None:  # a site that requires secure aggregation never sends its update in the clear
            refuse_clear(site.policy, "this round's update and train loss")
        before_work(msg, ctx, site, setup)
        runtime, plan, eff, data, state = prepare(msg, site)
        ask = read(ClientDpAsk, msg.content, "train")
        if ask.client_dp and ask.noise == "sites" and setup is None:
            raise PolicyRefused("asked to add only a share of the client-level noise, but without secure aggregation: the "
                                "coordinator would see this update with 1/m of the noise; nothing released")
        privacy: tuple[dict, dict] | None = None
        if eff.dp:
            result, *privacy = private_round(runtime, plan, eff, ctx, data.train, state, _settings(plan), site=site,
                                            num_labels=len(data.labels))
        else:
            result = train_local(runtime, state, data.train, _settings(plan), seed=plan.seed, site=site.name,
                                 cohort=site.cohort, num_labels=len(data.labels), round_=plan.round)
        delta, unclipped = result.delta, None
        if ask.client_dp:
            delta, unclipped = client_level_update(delta, ask, site=site, plan=plan)
        loss = None if eff.dp else result.train_loss  # under DP the loss stays at the site
        if setup is not None:  # the update stays here, masked, until stage 3
            vector = secagg_site.train_vector(setup, delta, result.num_examples, 0.0 if loss is None else loss,
                                              weight=1.0 if ask.client_dp else None, unclipped=int(unclipped or 0))
            content = secagg_site.begin(ctx, setup, vector, sum_of=secagg_site.SumOf(site.cohort, plan.round, "train"),
                                        state_dir=site.state_dir, credentials=site.credentials,
                                        request=secagg_site.request_digest(msg.content))
        else:
            update, _ = to_record(delta, plan.wire_dtype)
            metrics = TrainMetrics(num_examples=result.num_examples, steps=result.steps, train_loss=loss,
                                   train_seconds=None if eff.dp else result.seconds, update_unclipped=unclipped)
            content = RecordDict({"update": update, TrainMetrics.record: record_of(metrics)})
        if privacy is not None:
            content["privacy_event"], content["privacy"] = ConfigRecord(privacy[0]), ConfigRecord(privacy[1])
        how = "masked for secure aggregation" if setup is not None else "sent in the clear"
        if eff.dp:
            log.info("site %s round %d: trained with DP, epsilon %.3f of %g spent (%d steps); update %s", site.name, plan.round,
                     float(privacy[1]["epsilon_spent"]), float(privacy[1]["budget_epsilon"]), result.steps, how)
        else:
            log.info("site %s round %d: trained %d steps on %d records without DP; update %s", site.name, plan.round, result.steps,
                     result.num_examples, how)
        return content

    def evaluate(msg: Message, ctx: Context, site: SiteSpec) -> RecordDict:
        setup = secagg_setup(msg)
        if setup is None and site.policy.require_secure_aggregation:  # in the clear only what never leaves the site
            asked = effective_privacy(site.policy, read(PrivacyAsk, msg.content, "evaluate"))
            if (asked.eval_metrics if asked.dp else "public") != "site":
                refuse_clear(site.policy, "this round's eval metrics")
        before_work(msg, ctx, site, setup)
        runtime, plan, eff, data, state = prepare(msg, site)
        res = evaluate_local(runtime, state, data.eval, seed=plan.seed, cohort=site.cohort, labels=data.labels)
        mode = eff.eval_metrics if eff.dp else "public"
        if mode == "site":
            _keep_metrics(site, plan.round, res)
            return RecordDict({EvalKept.record: record_of(EvalKept())})
        privacy = None
        values = eval_release.metric_vector(res.loss_sum_capped, int(round(res.accuracy * res.num_examples)), list(res.label_counts))
        if mode == "noised":
            values, *privacy = private_eval_noise(plan, eff, ctx, len(data.train), _settings(plan), site=site, values=values)
            shown = eval_release.read(values)
            loss, accuracy, n, counts, seconds = shown.eval_loss, shown.accuracy, shown.num_examples, shown.label_counts, None
        else:
            loss, accuracy, n, counts, seconds = res.loss, res.accuracy, res.num_examples, list(res.label_counts), res.seconds
        if setup is not None:  # the metrics stay here, masked, until stage 3
            vector = (eval_release.integer_vector(values, secagg_site.EVAL_LOSS_SCALE) if mode == "noised"
                      else secagg_site.metrics_vector(res.loss, res.accuracy, res.num_examples, list(res.label_counts)))
            content = secagg_site.begin(ctx, setup, vector, sum_of=secagg_site.SumOf(site.cohort, plan.round, "evaluate"),
                                        state_dir=site.state_dir, credentials=site.credentials,
                                        request=secagg_site.request_digest(msg.content))
        else:
            content = RecordDict({EvalMetrics.record: record_of(EvalMetrics(eval_loss=loss, accuracy=accuracy, num_examples=n,
                                                                             label_counts=tuple(counts), eval_seconds=seconds))})
        if privacy is not None:
            content["privacy_event"], content["privacy"] = ConfigRecord(privacy[0]), ConfigRecord(privacy[1])
        return content

    app.query()(guarded(query))
    app.train()(guarded(train))
    app.evaluate()(guarded(evaluate))
    for stage in (secagg_site.share, secagg_site.masked, secagg_site.unmask):
        handler = guarded(lambda msg, ctx, site, stage=stage: stage(ctx, msg.content))
        app.train(f"secagg_{stage.__name__}")(handler)
        app.evaluate(f"secagg_{stage.__name__}")(handler)
    check = guarded(lambda msg, ctx, site: secagg_site.check(ctx, msg.content, credentials=site.credentials))
    app.train("secagg_check")(check)
    app.evaluate("secagg_check")(check)
    return app


# `flwr run .` / SuperNode entry point: the site's data lives in its node config.
app = make_client_app()
