"""The fedlora ClientApp (Flower Message API): what a data site does when asked.

Message types and their records:

* ``query``    <- ``ConfigRecord "config"`` (the model spec, with the base model's name and hash);
                  -> reply ``ConfigRecord "site"``: ``name``, ``cohort``; a site holding another base model refuses.
* ``train``    <- ``ArrayRecord "adapter"`` (the cohort's global adapter, wire dtype),
                  ``ConfigRecord "config"`` (round, cohort, labels, seed, model spec, local
                  training settings, wire dtype);
               -> ``ArrayRecord "update"`` (trained minus global, wire dtype),
                  ``MetricRecord "metrics"``: num_examples, train_loss, steps, train_seconds;
                  with DP also ``ConfigRecord "privacy_event"`` (the round's DpSgdEvent) and
                  ``ConfigRecord "privacy"``: epsilon_spent, budget_epsilon, delta, delta_rule. A round that would exceed
                  the site's budget is refused (error code 4202, ``BudgetExhausted``).
* ``evaluate`` <- the same records; -> ``MetricRecord "metrics"``: eval_loss, accuracy,
                  num_examples, label_counts, eval_seconds.
* secure aggregation (a ``ConfigRecord "secagg"`` beside the config: round id, the site's
  neighbours, threshold, modulus, quantiser): ``train`` and ``evaluate`` reply with
  ``ConfigRecord "secagg"`` (two public keys) instead of the update or the metrics, which stay
  at the site, masked, until ``<kind>.secagg_share`` / ``_masked`` / ``_unmask`` (stages 2-4,
  ``fedlora.client.secagg_site``); the privacy event still travels with the keys.

A problem at the site (bad data, wrong cohort, non-finite update) becomes an error reply
whose reason names it; the coordinator logs it and aggregates without that site.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.errors import BUDGET_EXHAUSTED_CODE, SITE_ERROR_CODE, FedloraError
from fedlora.model import LoraRuntime, ModelSpec, get_runtime
from fedlora.records import from_record, to_record
from fedlora.task import EncodedExamples

from .data import load_labelled_texts, shard, split_train_eval
from . import secagg_site
from .privacy_site import BudgetExhausted, client_level_update, private_round
from .site import SiteSpec
from .trainer import LocalTrainSettings, evaluate_local, train_local

log = logging.getLogger("fedlora.client")


@dataclass(frozen=True)
class SiteData:
    train: EncodedExamples
    eval: EncodedExamples
    labels: tuple[str, ...]


_DATA_CACHE: dict[tuple, SiteData] = {}


def site_data(site: SiteSpec, labels: Sequence[str], runtime: LoraRuntime, seed: int, eval_fraction: float) -> SiteData:
    """Load, validate, split and tokenise a site's data once per process."""
    key = (site, tuple(labels), str(runtime.path), runtime.spec.max_length, seed, eval_fraction)
    if key not in _DATA_CACHE:
        data, label_list = load_labelled_texts(site.data_path, site.text_column, site.label_column, labels)
        if site.shard_count > 1:
            data = shard(data, site.shard_index, site.shard_count, seed, f"{site.cohort}:{site.data_path}")
        train, held_out = split_train_eval(data, eval_fraction, seed, site.name)
        enc = runtime.task.encode
        tok, n = runtime.tokenizer, runtime.spec.max_length
        _DATA_CACHE[key] = SiteData(enc(tok, train.texts, train.labels, n), enc(tok, held_out.texts, held_out.labels, n), tuple(label_list))
    return _DATA_CACHE[key]


def site_model(cfg: ConfigRecord, site: SiteSpec) -> ModelSpec:
    """The coordinator's model spec with this site's own copy of the base model (``site.model``,
    if the site names one); refuses a copy whose name or hash differs from the coordinator's."""
    spec = ModelSpec.from_flat(cfg)
    if site.model:
        spec = replace(spec, source=site.model)
    spec.check_base_model(spec.source)
    return spec


def _settings(cfg: ConfigRecord) -> LocalTrainSettings:
    return LocalTrainSettings(local_steps=int(cfg["train.local_steps"]), local_epochs=float(cfg["train.local_epochs"]),
                              batch_size=int(cfg["train.batch_size"]), optimizer=str(cfg["train.optimizer"]),
                              learning_rate=float(cfg["train.learning_rate"]), weight_decay=float(cfg["train.weight_decay"]),
                              max_grad_norm=float(cfg["train.max_grad_norm"]))


def make_client_app(sites: Sequence[SiteSpec] | None = None, *, device: str = "auto", dtype: str = "auto") -> ClientApp:
    """A ClientApp. With ``sites`` (simulation) a node's site is ``sites[partition-id]``;
    without (deployment) it is read from the node config (``SiteSpec.from_node_config``)."""
    app = ClientApp()
    table = tuple(sites) if sites is not None else None

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
                log.log(logging.WARNING if budget else logging.ERROR, "site %s refused %s: %s", site.name, msg.metadata.message_type, e)
                code = BUDGET_EXHAUSTED_CODE if budget else SITE_ERROR_CODE
                return Message(Error(code=code, reason=f"site {site.name}: {e}"), reply_to=msg)

        return run

    def prepare(msg: Message, site: SiteSpec) -> tuple[LoraRuntime, ConfigRecord, SiteData, dict]:
        cfg = msg.content["config"]
        if str(cfg["cohort"]) != site.cohort:
            raise FedloraError(f"asked to work for cohort {cfg['cohort']!r}, but this site belongs to {site.cohort!r}")
        runtime = get_runtime(site_model(cfg, site), site.device or device, dtype)
        labels = list(cfg["labels"])
        data = site_data(site, labels, runtime, int(cfg["seed"]), float(cfg["train.eval_fraction"]))
        state, _ = from_record(msg.content["adapter"], runtime.adapter_shapes(len(labels)))
        return runtime, cfg, data, state

    def query(msg: Message, ctx: Context, site: SiteSpec) -> RecordDict:
        if "config" in msg.content:  # the coordinator names its base model: refuse to join with another
            site_model(msg.content["config"], site)
        return RecordDict({"site": ConfigRecord({"name": site.name, "cohort": site.cohort})})

    def train(msg: Message, ctx: Context, site: SiteSpec) -> RecordDict:
        runtime, cfg, data, state = prepare(msg, site)
        privacy: tuple[dict, dict] | None = None
        if bool(cfg.get("privacy.dp", False)):
            budget = site.budget_epsilon or float(cfg["privacy.epsilon"])
            result, *privacy = private_round(runtime, cfg, ctx, data.train, state, _settings(cfg), site=site.name, cohort=site.cohort,
                                            num_labels=len(data.labels), budget_epsilon=budget,
                                            state_file=Path(site.state_dir) / "privacy.json" if site.state_dir else None)
        else:
            result = train_local(runtime, state, data.train, _settings(cfg), seed=int(cfg["seed"]), site=site.name,
                                 cohort=site.cohort, num_labels=len(data.labels), round_=int(cfg["round"]))
        delta, extra = result.delta, {}
        client_dp = bool(cfg.get("privacy.client_dp", False))
        if client_dp:
            delta, extra["update_unclipped"] = client_level_update(delta, cfg, site=site.name)
        if "secagg" in msg.content:  # the update stays here, masked, until stage 3
            vector = secagg_site.train_vector(msg.content["secagg"], delta, result.num_examples, result.train_loss, weight=1.0 if client_dp else None,
                                              unclipped=int(extra.get("update_unclipped", 0)))
            content = secagg_site.begin(ctx, msg.content["secagg"], vector)
        else:
            update, _ = to_record(delta, str(cfg["wire_dtype"]))
            metrics = MetricRecord({"num_examples": result.num_examples, "train_loss": result.train_loss,
                                    "steps": result.steps, "train_seconds": result.seconds, **extra})
            content = RecordDict({"update": update, "metrics": metrics})
        if privacy is not None:
            content["privacy_event"], content["privacy"] = ConfigRecord(privacy[0]), ConfigRecord(privacy[1])
        return content

    def evaluate(msg: Message, ctx: Context, site: SiteSpec) -> RecordDict:
        runtime, cfg, data, state = prepare(msg, site)
        res = evaluate_local(runtime, state, data.eval, seed=int(cfg["seed"]), cohort=site.cohort, num_labels=len(data.labels))
        if "secagg" in msg.content:  # the metrics stay here, masked, until stage 3
            return secagg_site.begin(ctx, msg.content["secagg"], secagg_site.metrics_vector(res.loss, res.accuracy, res.num_examples, list(res.label_counts)))
        return RecordDict({"metrics": MetricRecord({"eval_loss": res.loss, "accuracy": res.accuracy,
                                                    "num_examples": res.num_examples, "label_counts": res.label_counts,
                                                    "eval_seconds": res.seconds})})

    app.query()(guarded(query))
    app.train()(guarded(train))
    app.evaluate()(guarded(evaluate))
    for stage in (secagg_site.share, secagg_site.masked, secagg_site.unmask):
        handler = guarded(lambda msg, ctx, site, stage=stage: stage(ctx, msg.content))
        app.train(f"secagg_{stage.__name__}")(handler)
        app.evaluate(f"secagg_{stage.__name__}")(handler)
    return app


# `flwr run .` / SuperNode entry point: the site's data lives in its node config.
app = make_client_app()
