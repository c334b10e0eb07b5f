"""Adversarial review of the issue-11 privacy defences: the coordinator of DESIGN.md section 7
(it sends any message and any config, asks twice, replays, and knows everything it sends) against
the sites' real ClientApp handlers (``fedlora.client.app.make_client_app``), called directly with
crafted messages so that every knob is under the attacker's control. Selected by ``-k review``.

Every test asserts that the attack FAILS (is refused, or gains nothing beyond the site's budget).
Where the attack works today the test is ``xfail(strict=True, raises=AssertionError)``: the
reason names the hole; setup problems raise ``RuntimeError`` (never an AssertionError), so a
broken set-up can never pass for a hole. When a hole is fixed its test XPASSes (strict): remove
the mark then.
"""

from __future__ import annotations

import collections
import csv
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedlora.client.app import make_client_app, site_data
from fedlora.client.data import LabelledTexts, split_train_eval
from fedlora.client.privacy_site import STATE_KEY
from fedlora.client.site import SiteSpec
from fedlora.errors import (BUDGET_EXHAUSTED_CODE, POLICY_REFUSED_CODE, PROTOCOL_ERROR_CODE, ConfigError)
from fedlora.model import ModelSpec, get_runtime
from fedlora.privacy.accounting import Mechanism, epsilon
from fedlora.privacy.events import DpSgdEvent, EvalNoiseEvent, event_from_dict
from fedlora.privacy.policy import SitePolicy, public_size
from fedlora.protocol import ClientDpAsk, PrivacyAsk, RoundPlan, SecAggSetup, record_of
from fedlora.records import from_record, to_record
from fedlora.simulation import demo_data

COHORT = "finance"
LABELS = tuple(demo_data.LABELS[COHORT])
FMAX = float(np.finfo(np.float32).max)
HOLE = dict(strict=True, raises=AssertionError)


def _require(ok: bool, what: str) -> None:
    """A set-up check: RuntimeError (not AssertionError), so a broken set-up never reads as a hole."""
    if not ok:
        raise RuntimeError(f"test set-up: {what}")


class Harness:
    """One virtual site per test, its real handlers, and messages forged field by field."""

    def __init__(self, model: Path, root: Path) -> None:
        self.root = root
        self.spec = ModelSpec(str(model), 32, "sequence_classification", 4, 8.0, 0.0, ("query", "value"), "standard")
        self.runtime = get_runtime(self.spec, "cpu")
        self.data40 = self.demo(40)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID  # as LocalGrid does

    def demo(self, rows: int) -> Path:
        return demo_data.write_cohort(self.root / f"demo{rows}", COHORT, 1, seed=0, examples_per_site=rows, size_skew=0.0,
                                      label_skew=1.0)[0]

    def site(self, tag: str, data: Path | None = None, **policy) -> SiteSpec:
        state = self.root / "state" / tag
        shutil.rmtree(state, ignore_errors=True)
        return SiteSpec(f"{COHORT}-1", COHORT, str(data or self.data40), state_dir=str(state),
                        policy=SitePolicy(**{"epsilon": 4.0, "require_secure_aggregation": False, **policy}))  # clear messages

    @staticmethod
    def app(site: SiteSpec):
        return make_client_app([site], device="cpu")

    @staticmethod
    def ctx(run_id: int = 1, node_config: dict | None = None) -> Context:
        return Context(run_id=run_id, node_id=1001, node_config=node_config or {"partition-id": 0}, state=RecordDict(), run_config={})

    def adapter(self, seed: int = 0, runtime=None) -> dict[str, np.ndarray]:
        return (runtime or self.runtime).initial_adapter(seed, COHORT, len(LABELS))

    def msg(self, kind: str = "train", *, plan: dict | None = None, ask: dict | None = None, adapter=None, client: ClientDpAsk | None = None,
            raw: dict | None = None, drop: tuple[str, ...] = (), spec: ModelSpec | None = None, secagg: SecAggSetup | None = None) -> Message:
        p = dict(round=1, cohort=COHORT, labels=LABELS, seed=0, wire_dtype="float32", local_steps=2, local_epochs=0.0, batch_size=8,
                 optimizer="sgd", learning_rate=0.01, weight_decay=0.0, max_grad_norm=0.0, eval_fraction=0.2, rounds=2, eval_every=1)
        p.update(plan or {})
        parts = [RoundPlan(**p), PrivacyAsk(**{"dp": True, "epsilon": 4.0, **(ask or {})})] + ([client] if client else [])
        cfg = record_of(*parts)
        cfg.update((spec or self.spec).to_flat())
        cfg.update(raw or {})
        for k in drop:
            del cfg[k]
        rec, _ = to_record(self.adapter() if adapter is None else adapter, "float32")
        content = RecordDict({"adapter": rec, "config": cfg})
        if secagg is not None:
            content["secagg"] = record_of(secagg)
        m = Message(content, 1001, kind, group_id=str(p["round"]))
        m.metadata.__dict__["_message_id"] = str(uuid4())
        return m


@pytest.fixture(scope="module")
def h(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Harness:
    return Harness(tiny_model, tmp_path_factory.mktemp("review"))


def _call(app, msg: Message, ctx: Context):
    """The handler's reply, or the exception it raised (a crash is no named refusal)."""
    try:
        return app(msg, ctx)
    except Exception as e:  # noqa: BLE001 - the tests assert on what came back
        return e


def _ok(reply) -> bool:
    return isinstance(reply, Message) and not reply.has_error()


def _code(reply) -> int | None:
    return reply.error.code if isinstance(reply, Message) and reply.has_error() else None


def _event(reply) -> DpSgdEvent | EvalNoiseEvent:
    return event_from_dict(dict(reply.content["privacy_event"]))


def _spent(events, delta: float = 1e-5, accountant: str = "rdp") -> float:
    """Epsilon of everything released (the site's own accountant math, the budget's yardstick)."""
    return epsilon([Mechanism(e.noise_multiplier, e.sample_rate, e.steps) for e in events], delta, accountant)


def _flat(reply) -> np.ndarray:
    delta, _ = from_record(reply.content["update"])
    return np.concatenate([delta[k].ravel() for k in sorted(delta)])


def _pld_epsilon(events, delta: float, pessimistic: bool) -> float:
    """Independent figure (Google ``dp_accounting`` PLD): pessimistic = an upper bound, optimistic = a lower bound."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    total = None
    for e in events:
        d = pld.from_gaussian_mechanism(e.noise_multiplier, pessimistic_estimate=pessimistic, sampling_prob=e.sample_rate,
                                        value_discretization_interval=1e-3).self_compose(e.steps)
        total = d if total is None else total.compose(d)
    return float(total.get_epsilon_for_delta(delta))


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


# =====================================================================================
# Defences that hold
# =====================================================================================

def test_review_underannounced_rounds_and_a_changed_batch_stay_within_budget(h: Harness) -> None:
    """The coordinator announces 1 round (so the site calibrates a small sigma), then keeps asking
    for rounds with the batch raised to the whole set (q = 1) and 3x the steps: the site's
    calibrated sigma stays, each round is checked at its real q and steps, and past the budget it
    refuses with nothing released."""
    site = h.site("underannounce")
    app, ctx = h.app(site), h.ctx()
    replies = [_call(app, h.msg(plan={"round": 1, "rounds": 1}), ctx)]
    for r in range(2, 6):
        replies.append(_call(app, h.msg(plan={"round": r, "rounds": 1, "batch_size": 32, "local_steps": 6}), ctx))
    released = [_event(r) for r in replies if _ok(r)]
    assert _ok(replies[0]) and len({e.noise_multiplier for e in released}) == 1
    assert _spent(released) <= 4.0 + 1e-9
    refused = [r for r in replies if not _ok(r)]
    assert refused and all(_code(r) == BUDGET_EXHAUSTED_CODE for r in refused)


def test_review_repeated_noised_evaluations_are_each_charged_and_capped(h: Harness) -> None:
    """Averaging attack on noised eval metrics: the same evaluation asked 20 times. Each answer
    carries fresh noise and its own charged event; the site stops at its budget, so averaging
    buys nothing the budget does not already allow."""
    site = h.site("evalmany", eval_metrics="noised", epsilon=2.0, eval_budget_fraction=0.5)
    app, ctx = h.app(site), h.ctx()
    replies = [_call(app, h.msg("evaluate", plan={"round": 0, "rounds": 1}, ask={"eval_metrics": "noised", "epsilon": 2.0}), ctx)
               for _ in range(20)]
    released = [r for r in replies if _ok(r)]
    assert 2 <= len(released) < 20
    assert all(_code(r) == BUDGET_EXHAUSTED_CODE for r in replies[len(released):])
    events = [_event(r) for r in released]
    assert all(isinstance(e, EvalNoiseEvent) for e in events) and _spent(events) <= 2.0 + 1e-9
    ledger = json.loads(str(ctx.state[STATE_KEY]["doc"]))["ledger"]["events"]
    assert sum(e["kind"] == "eval_noise" for e in ledger) == len(released)  # every answer charged
    counts = {tuple(r.content["metrics"]["label_counts"]) + (r.content["metrics"]["eval_loss"],) for r in released}
    assert len(counts) > 1  # fresh noise each time (no cached answer to difference against)


def test_review_a_replayed_round_gets_the_same_release_and_a_changed_adapter_is_charged(h: Harness) -> None:
    """Asking round 1 again with the same adapter (even with another lr and batch, and a forged
    ``privacy.reproducible_noise`` key) returns the first release, uncharged; a one-ulp change
    of the adapter gets fresh noise and a second charge: no two free noisy views of one round."""
    site = h.site("replay")
    app, ctx = h.app(site), h.ctx()
    a = h.adapter()
    first = _call(app, h.msg(adapter=a, raw={"privacy.reproducible_noise": True}), ctx)
    again = _call(app, h.msg(adapter=a, plan={"learning_rate": 0.5, "batch_size": 16}), ctx)
    b = {k: v.copy() for k, v in a.items()}
    b["classifier.bias"][0] = np.nextafter(b["classifier.bias"][0], np.float32(1))
    other = _call(app, h.msg(adapter=b), ctx)
    assert _ok(first) and _ok(again) and _ok(other)
    assert first.content["privacy"]["noise"] == "secret"
    assert np.array_equal(_flat(first), _flat(again))
    assert not np.allclose(_flat(first), _flat(other))
    ledger = json.loads(str(ctx.state[STATE_KEY]["doc"]))["ledger"]["events"]
    assert len(ledger) == 2


def test_review_the_coordinators_choice_of_accountant_gains_nothing_beyond_the_budget(h: Harness) -> None:
    """A site without an accountant of its own takes the coordinator's; the coordinator asks
    ``prv`` (tighter, so a smaller sigma is calibrated), then alternates ``rdp``/``prv`` to take
    whichever lets another round through. An independent upper bound (dp_accounting PLD,
    pessimistic) of everything released stays within the budget, and the PRV figure the site
    used is not below an independent lower bound (PLD, optimistic)."""
    site = h.site("accountant")
    app, ctx = h.app(site), h.ctx()
    replies = [_call(app, h.msg(plan={"round": r, "rounds": 2}, ask={"accountant": "prv" if r % 2 else "rdp"}), ctx) for r in range(1, 5)]
    released = [_event(r) for r in replies if _ok(r)]
    assert len(released) >= 2 and not _ok(replies[-1])
    assert _pld_epsilon(released, 1e-5, pessimistic=True) <= 4.0 * (1 + 1e-3)
    assert _pld_epsilon(released, 1e-5, pessimistic=False) <= _spent(released, accountant="prv") + 1e-6


def test_review_public_or_dp_off_requests_never_release_a_sites_kept_metrics(h: Harness) -> None:
    site = h.site("evalkept")
    app, ctx = h.app(site), h.ctx()
    for ask in ({"eval_metrics": "public"}, {"eval_metrics": "public", "dp": False, "epsilon": 900.0}):
        reply = _call(app, h.msg("evaluate", plan={"round": 0}, ask=ask), ctx)
        assert _ok(reply) and set(reply.content) == {"kept"}
    noised = h.site("evalnoised", eval_metrics="noised")
    reply = _call(h.app(noised), h.msg("evaluate", plan={"round": 0}, ask={"eval_metrics": "public"}), h.ctx())
    assert _ok(reply) and isinstance(_event(reply), EvalNoiseEvent)  # noised, charged: not the exact metrics


def test_review_a_delta_above_the_automatic_one_is_refused_and_nothing_leaves(h: Harness) -> None:
    site = h.site("delta")  # no largest delta of its own: the automatic 1e-5 on its public size
    reply = _call(h.app(site), h.msg(ask={"delta": 1e-3}), h.ctx())
    assert _code(reply) == POLICY_REFUSED_CODE and "delta 0.001" in reply.error.reason
    smaller = _call(h.app(h.site("delta-small")), h.msg(ask={"delta": 1e-7}), h.ctx())
    assert _ok(smaller) and smaller.content["privacy"]["delta"] == pytest.approx(1e-7)


@pytest.mark.parametrize("raw, drop, key", [
    ({"train.batch_size": "8"}, (), "train.batch_size"),
    ({"train.batch_size": 8.0}, (), "train.batch_size"),
    ({"privacy.dp": 1}, (), "privacy.dp"),
    ({"privacy.epsilon": "4"}, (), "privacy.epsilon"),
    ({"train.rounds": True}, (), "train.rounds"),
    ({"labels": "negative"}, (), "labels"),
    ({}, ("train.rounds",), "train.rounds"),
], ids=["batch-str", "batch-float", "dp-int", "epsilon-str", "rounds-bool", "labels-str", "rounds-missing"])
def test_review_wrong_types_are_protocol_errors_naming_the_key(h: Harness, raw: dict, drop: tuple, key: str) -> None:
    reply = _call(h.app(h.site("types")), h.msg(raw=raw, drop=drop), h.ctx())
    assert _code(reply) == PROTOCOL_ERROR_CODE and key in reply.error.reason


def test_review_a_deployed_site_without_state_folder_refuses_dp(h: Harness) -> None:
    app = make_client_app(device="cpu")  # deployment: the site comes from its node config
    ctx = h.ctx(node_config={"domain": COHORT, "data-path": str(h.data40), "epsilon": "4", "site-name": "bank",
                             "allow-clear-aggregation": "true"})  # a clear round: the state folder is what is refused
    reply = _call(app, h.msg(ask={"dp": False}), ctx)
    assert _code(reply) == POLICY_REFUSED_CODE and "state folder" in reply.error.reason


@pytest.mark.parametrize("key, value", [
    ("epsilon", "nan"), ("epsilon", "inf"), ("epsilon", "-1"), ("epsilon", "four"), ("delta", "0.5"), ("delta", "nan"),
    ("public-size", "-3"), ("public-size", "1.5"), ("accountant", "gdp"), ("eval-metrics", "everything"),
    ("public-size", 2.7),  # was a hole: truncated by int() instead of refused
])
def test_review_odd_node_config_values_are_refused(h: Harness, key: str, value) -> None:
    node = {"domain": COHORT, "data-path": str(h.data40), "state-dir": str(h.root / "nc"), key: value}
    try:
        SiteSpec.from_node_config(node)
        refused = None
    except ConfigError as e:
        refused = e
    assert refused is not None and "node-config" in str(refused)


# =====================================================================================
# Holes (xfail strict): ranked in the report
# =====================================================================================

def _pooled(h: Harness, examples, state) -> np.ndarray:
    rt = h.runtime
    rt.load_adapter(state, 0, COHORT, len(LABELS))
    rt.model.eval()
    b = rt.task.batch(examples, np.arange(len(examples)), int(rt.tokenizer.pad_token_id), rt.device)
    with torch.no_grad():
        return rt.model.pooled(b["input_ids"], b["attention_mask"]).numpy()


def _overflow_head(state: dict, unit: int, threshold: float) -> dict:
    """A finite head (it passes the wire's checks) whose logit 0 overflows to +inf, so the
    per-example loss is NaN, exactly for the inputs whose pooled feature ``unit`` exceeds ``threshold``."""
    out = {k: v.copy() for k, v in state.items()}
    a = 1e38
    out["classifier.weight"][:] = 0
    out["classifier.weight"][0, unit] = a
    out["classifier.bias"][:] = 0
    out["classifier.bias"][0] = np.float32(FMAX - a * float(threshold))
    return out


def test_review_crafted_adapter_turns_the_noised_eval_release_into_a_membership_oracle(h: Harness) -> None:
    site = h.site("nan-eval", eval_metrics="noised")
    data = site_data(site, list(LABELS), h.runtime, 0, 0.2)
    base = h.adapter()
    ev, tr = _pooled(h, data.eval, base), _pooled(h, data.train, base)
    everyone = np.concatenate([ev, tr])
    best = max(((ev[:, j].max() - np.sort(everyone[:, j])[-2], j) for j in range(ev.shape[1])))
    gap, j = best
    target = int(np.argmax(ev[:, j]))
    crafted = _overflow_head(base, j, float(ev[target, j]) - gap / 2)
    h.runtime.load_adapter(crafted, 0, COHORT, len(LABELS))
    batch = h.runtime.task.batch(data.eval, np.arange(len(data.eval)), int(h.runtime.tokenizer.pad_token_id), "cpu")
    with torch.no_grad():
        per_example, _ = h.runtime.task.loss(h.runtime.model, batch, reduction="none")
    bad = np.flatnonzero(~np.isfinite(per_example.numpy()))
    _require(list(bad) == [target], f"the crafted head should make exactly the target's loss non-finite, got {bad}")
    reply = _call(h.app(site), h.msg("evaluate", plan={"round": 0}, ask={"eval_metrics": "noised"}, adapter=crafted), h.ctx())
    _require(_ok(reply), f"the site should answer the noised evaluation: {reply}")
    # the release must be a Gaussian mechanism's output: finite, and not a deterministic function of one record
    assert math.isfinite(float(reply.content["metrics"]["eval_loss"]))


def test_review_crafted_adapter_turns_the_dp_sgd_release_into_a_data_dependent_error(h: Harness) -> None:
    site = h.site("nan-train")
    data = site_data(site, list(LABELS), h.runtime, 0, 0.2)
    base = h.adapter()
    tr = _pooled(h, data.train, base)
    j = int(np.argmax(tr.min(axis=0)))  # a feature every training record has well above 0
    _require(tr[:, j].min() > 0.01, "no positive pooled feature to trigger on")
    crafted = _overflow_head(base, j, 0.5 * float(tr[:, j].min()))
    app, ctx = h.app(site), h.ctx()
    plan = {"batch_size": 32, "local_steps": 2, "rounds": 5}
    control = _call(app, h.msg(plan={**plan, "round": 1}, adapter=base), ctx)
    _require(_ok(control), f"the benign adapter should train: {control}")
    reply = _call(app, h.msg(plan={**plan, "round": 2}, adapter=crafted), ctx)
    assert _ok(reply) and np.all(np.isfinite(_flat(reply)))


@pytest.mark.xfail(**HOLE, reason="HIGH: plan.labels comes from the coordinator and load_labelled_texts raises a DataError naming "
                   "the row, the label and the file path when a record's label is missing from it: one probe tells whether "
                   "the site holds a record with that label, outside any DP accounting. Fix: the site's label set is its own "
                   "(node config) or rows outside the list are dropped silently; data errors reply without row details")
def test_review_a_label_list_probe_reveals_whether_a_record_is_there(h: Harness, tmp_path: Path) -> None:
    rows = [(f"Company {i} reported {'weak' if i % 2 else 'flat'} results in quarter {i % 4 + 1}.", "negative" if i % 2 else "neutral")
            for i in range(30)]
    with_it = _write_csv(tmp_path / "with.csv", rows[:15] + [("Nordbank beat expectations and raised its outlook.", "positive")] + rows[15:])
    without = _write_csv(tmp_path / "without.csv", rows)
    answers = []
    for tag, path in (("label-with", with_it), ("label-without", without)):
        reply = _call(h.app(h.site(tag, data=path)), h.msg(plan={"labels": ("negative", "neutral", "probe")}), h.ctx())
        answers.append((_ok(reply), _code(reply)))
    assert answers[0] == answers[1]  # the site's answer must not depend on whether it holds that record


def test_review_two_interleaved_runs_cannot_spend_the_budget_twice(h: Harness) -> None:
    site = h.site("concurrent")
    app = h.app(site)
    run_a, run_b = h.ctx(run_id=1), h.ctx(run_id=2)
    released = []
    for ctx, round_ in ((run_a, 1), (run_b, 1), (run_b, 2), (run_a, 2), (run_a, 3), (run_b, 3)):
        adapter = h.adapter(seed=ctx.run_id)  # each run its own global adapter (no cached release)
        reply = _call(app, h.msg(plan={"round": round_, "rounds": 2}, adapter=adapter), ctx)
        _require(_ok(reply) or _code(reply) == BUDGET_EXHAUSTED_CODE, f"unexpected reply {reply}")
        if _ok(reply):
            released.append(_event(reply))
    assert _spent(released) <= 4.0 + 1e-9


def test_review_the_update_scale_does_not_reveal_the_exact_training_size(h: Harness) -> None:
    spec16 = replace(h.spec, lora_rank=16, lora_alpha=32.0)  # the coordinator picks the rank: more coordinates to average
    rt16 = get_runtime(spec16, "cpu")
    site = h.site("scale", data=h.demo(132))
    n_train = len(site_data(site, list(LABELS), rt16, 0, 0.2).train)
    n_pub = public_size(n_train)
    _require((n_train, n_pub) == (105, 100), f"expected 105 training records reported as 100, got {n_train}, {n_pub}")
    # q = 1, plain SGD at lr 1, one step, a large noise floor (more privacy, so the site takes it): update = -(S + Z) / round(q n)
    reply = _call(h.app(site), h.msg(spec=spec16, adapter=h.adapter(runtime=rt16), plan={"batch_size": 100, "local_steps": 1,
                  "learning_rate": 1.0, "rounds": 3}, ask={"noise_multiplier": 50.0, "max_grad_norm": 1.0}), h.ctx())
    _require(_ok(reply), f"the probe round should train: {reply}")
    event = _event(reply)
    delta, _ = from_record(reply.content["update"])
    lora = np.concatenate([delta[k].ravel() for k in sorted(delta) if ".lora_" in k])
    estimate = event.noise_multiplier * event.max_grad_norm / float(lora.std())
    assert abs(estimate - n_pub) < abs(estimate - n_train), f"the noise's spread gives n = {estimate:.1f}"


@pytest.mark.xfail(**HOLE, reason="MEDIUM: train.eval_fraction is the coordinator's; choosing fractions that leave < 100 training "
                   "records makes the 'public size' exact, and 5 probes pin the site's full size (1337) although it declares only "
                   "~1100. Fix: the split fraction (and seed) is the site's own, and the public size is derived from the full n")
def test_review_eval_fraction_probes_do_not_pin_the_exact_size(h: Harness) -> None:
    n_true = 1337
    site = h.site("fraction", data=h.demo(n_true))
    app, ctx = h.app(site), h.ctx()

    def n_train(n: int, f: float) -> int:
        return n - min(n - 1, max(1, int(np.ceil(f * n))))

    def ask(f: float, round_: int) -> int:
        reply = _call(app, h.msg(plan={"round": round_, "eval_fraction": f, "local_steps": 1, "rounds": 1000},
                                 ask={"noise_multiplier": 20.0}), ctx)  # what each probe costs is no concern of the attacker
        _require(_ok(reply), f"probe {f} should train: {reply}")
        return int(reply.content["metrics"]["num_examples"])

    first = ask(0.2, 1)
    candidates = {n for n in range(200, 5000) if public_size(n_train(n, 0.2)) == first}
    _require(n_true in candidates and len(candidates) > 50, f"the declared size should leave many candidates: {len(candidates)}")
    grid = [round(x, 4) for x in np.arange(0.925, 0.9995, 0.0001)]
    for round_ in range(2, 7):  # greedy: the fraction that splits the remaining candidates best
        f = min(grid, key=lambda g: max(collections.Counter(public_size(n_train(n, g)) for n in candidates).values()))
        seen = ask(f, round_)
        candidates = {n for n in candidates if public_size(n_train(n, f)) == seen}
    assert len(candidates) > 10, f"the coordinator narrowed the site's size to {sorted(candidates)}"


@pytest.mark.xfail(**HOLE, reason="MEDIUM: split_train_eval permutes positions, so adding ONE record to a site's file moves other "
                   "records between train and eval; the ledger's unit ('one record at one site') then does not hold for the "
                   "site's dataset. Fix: per-record assignment by a keyed hash of the record (independent of the others)")
def test_review_adding_one_record_changes_only_that_record_in_the_split() -> None:
    texts = tuple(f"record {i}" for i in range(60))
    d = LabelledTexts(texts, np.zeros(60, dtype=np.int64))
    d_plus = LabelledTexts(texts + ("the extra record",), np.zeros(61, dtype=np.int64))
    train, _ = split_train_eval(d, 0.2, 0, "site")
    train_plus, _ = split_train_eval(d_plus, 0.2, 0, "site")
    moved = set(train.texts) ^ set(train_plus.texts)
    assert moved <= {"the extra record"}, f"{len(moved)} records changed sides"


def test_review_renaming_a_deployed_site_without_key_keeps_its_spend(h: Harness) -> None:
    app = make_client_app(device="cpu")
    state = h.root / "state" / "renamed"
    shutil.rmtree(state, ignore_errors=True)
    released = []
    for round_, name in ((1, "bank-a"), (2, "bank-a"), (3, "bank-a"), (4, "bank-b"), (5, "bank-b")):
        node = {"domain": COHORT, "data-path": str(h.data40), "state-dir": str(state), "epsilon": 4.0, "site-name": name,
                "allow-clear-aggregation": "true"}  # clear rounds: the spend is what is checked
        reply = _call(app, h.msg(plan={"round": round_, "rounds": 2}), h.ctx(run_id=round_, node_config=node))
        _require(_ok(reply) or _code(reply) == BUDGET_EXHAUSTED_CODE, f"unexpected reply {reply}")
        if _ok(reply):
            released.append(_event(reply))
    assert _spent(released) <= 4.0 + 1e-9


@pytest.mark.parametrize("secure", [False, pytest.param(True, marks=pytest.mark.xfail(
    **HOLE, reason="MEDIUM: under secure aggregation a share N(0, (zC)^2/m) still trusts the coordinator's m: m = 10^6 in a "
    "3-site group leaves a tiny share. Fix: bound m by the site's secure group (neighbours + 1) and z by its policy"))],
    ids=["no-secagg", "secagg-m-inflated"])
def test_review_client_noise_shares_refuse_an_inflated_site_count(h: Harness, secure: bool) -> None:
    site = h.site(f"client-{secure}", epsilon=0.0)  # no sample-level budget: the share is the site's only noise
    ask = ClientDpAsk(client_dp=True, clip_norm=1.0, noise="sites", noise_multiplier=1.0, sites=10**6)
    setup = SecAggSetup(round_id="r1", threshold=2, modulus_bits=32, neighbours=(1002, 1003), bits=16, clip_range=8.0) if secure else None
    reply = _call(h.app(site), h.msg(ask={"dp": False}, client=ask, secagg=setup), h.ctx())
    assert _code(reply) == POLICY_REFUSED_CODE


def test_review_one_zero_step_plan_does_not_brick_the_site(h: Harness) -> None:
    site = h.site("zero-steps")
    app = h.app(site)
    poison = _call(app, h.msg(plan={"local_steps": 0, "rounds": 3}), h.ctx())
    _require(isinstance(poison, Message), f"the zero-step plan crashed the handler: {poison}")
    honest = _call(app, h.msg(plan={"round": 2, "rounds": 3}), h.ctx(run_id=2))
    assert _ok(honest), f"the site refuses honest rounds after one zero-step plan: {getattr(honest, 'error', honest)}"


@pytest.mark.parametrize("plan, ask", [
    ({}, {"accountant": "gdp"}),
    ({"batch_size": 0}, {}),
    ({"local_steps": -1}, {}),
    ({}, {"max_grad_norm": float("nan")}),
], ids=["accountant-unknown", "batch-0", "steps-negative", "clip-nan"])
def test_review_out_of_range_values_are_named_refusals(h: Harness, plan: dict, ask: dict) -> None:
    reply = _call(h.app(h.site("range")), h.msg(plan=plan, ask=ask), h.ctx())
    assert isinstance(reply, Message), f"the handler raised {type(reply).__name__}: {reply}"
    assert _code(reply) in (PROTOCOL_ERROR_CODE, POLICY_REFUSED_CODE)
