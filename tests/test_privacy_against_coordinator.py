"""The coordinator as the adversary of DESIGN.md section 7 (issue 11): every attack is tried with
the sites' real handlers (an in-process federation whose coordinator messages are rewritten, or
whose site replies are forged) and must fail or be refused. Selected by ``-k malicious``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord

from conftest import run_with
from fedlora.client.adapter_cache import adapter_for
from fedlora.client.app import site_data
from fedlora.client.dp_trainer import DpSgdSettings, train_local_dp
from fedlora.client.privacy_site import check_persistence, private_round
from fedlora.client.site import SiteSpec
from fedlora.client.trainer import LocalTrainSettings
from fedlora.errors import POLICY_REFUSED_CODE, FederationError
from fedlora.model import ModelSpec, get_runtime
from fedlora.privacy.events import event_from_dict
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.policy import PolicyRefused, PrivacyRequest, SitePolicy, effective_privacy, public_size
from fedlora.privacy.randomness import RoundSeeds
from fedlora.protocol import RoundPlan, site_releases
from fedlora.records import from_record
from fedlora.server.rundir import RunDir
from fedlora.simulation.runner import _write_demo_data, plan_sites, simulate

ONE_SITE = {"finance": {"sites": 1}}


def _asking(keys: dict):
    """A malicious coordinator: every message's config carries ``keys`` instead of what the run set."""
    def rewrite(msg, ctx):
        if "config" in msg.content:
            for k, v in keys.items():
                msg.content["config"][k] = v
        return msg
    return rewrite


def _train_replies(cfg, rewrite=None) -> tuple[Path, list]:
    seen = []

    def grab(msg, ctx, reply):
        if msg.metadata.message_type == "train":
            seen.append((msg, ctx, reply))
        return reply

    return run_with(cfg, grab, rewrite), seen


def _replay(cfg, run: Path, msg, reply, seeds: RoundSeeds) -> np.ndarray:
    """What a coordinator that knows everything it sent (seed, round, site, adapter) and even the
    site's data computes when it replays the site's DP-SGD with seeds it can derive."""
    site = _write_demo_data(cfg, plan_sites(cfg), RunDir(run), write=False)[0]
    runtime = get_runtime(ModelSpec.from_config(cfg), "cpu")
    plan = RoundPlan.read(msg.content["config"], "train")
    data = site_data(site, list(plan.labels), runtime, plan.seed, plan.eval_fraction)
    event = event_from_dict(dict(reply.content["privacy_event"]))
    state, _ = from_record(adapter_for(msg.content, "train"))  # sent now, or earlier and named by digest
    settings = LocalTrainSettings(event.steps, 0.0, plan.batch_size, plan.optimizer, plan.learning_rate, plan.weight_decay, 0.0)
    result, _ = train_local_dp(runtime, state, data.train, settings, DpSgdSettings(event.noise_multiplier, event.max_grad_norm, event.sample_rate),
                               seed=plan.seed, site=site.name, cohort=site.cohort, num_labels=len(plan.labels), round_=plan.round,
                               seeds=seeds)
    return np.concatenate([result.delta[k].ravel() for k in sorted(result.delta)])


def _released(reply) -> np.ndarray:
    delta, _ = from_record(reply.content["update"])
    return np.concatenate([delta[k].ravel() for k in sorted(delta)])


@pytest.mark.parametrize("reproducible", [True, False], ids=["seeded-research-noise", "secret-noise"])
def test_malicious_coordinator_replaying_the_noise_from_the_seed_fails(make_config, tmp_path: Path, reproducible: bool) -> None:
    """Finding 1: with everything the coordinator knows it re-derives the seeds and replays DP-SGD.
    Against the research switch (seeded noise) this removes the noise exactly (the attack works,
    which is why the report says such a run has no guarantee); against the sites' secret noise the
    replay is off by the noise itself."""
    cfg = make_config(tmp_path / "run", train__rounds=1, cohorts=ONE_SITE,
                      privacy={"dp": True, "epsilon": 4.0, "reproducible_noise": reproducible})
    run, seen = _train_replies(cfg)
    msg, _, reply = seen[0]
    guess = _replay(cfg, run, msg, reply, RoundSeeds.reproducible(cfg.seed, "finance-1", 1, 0))
    released = _released(reply)
    gap = float(np.max(np.abs(guess - released)))
    if reproducible:
        assert gap < 1e-5
    else:
        assert gap > 1e-3, "the replay must not reproduce the site's noise"
    assert json.loads((run / "summary.json").read_text())["privacy"]["sites"]["finance-1"]["noise"] == ("reproducible" if reproducible else "secret")


def test_two_dp_runs_differ_and_two_plain_runs_are_identical(make_config, tmp_path: Path) -> None:
    def adapter(name: str, **privacy) -> bytes:
        run, _ = simulate(make_config(tmp_path / name, train__rounds=1, cohorts=ONE_SITE, privacy=privacy), progress=False)
        return (run / "adapters" / "finance" / "adapter_model.safetensors").read_bytes()

    assert adapter("dp-a", dp=True, epsilon=4.0) != adapter("dp-b", dp=True, epsilon=4.0)
    assert adapter("plain-a", dp=False) == adapter("plain-b", dp=False)


def test_malicious_coordinator_switching_dp_off_gets_dp_anyway(make_config, tmp_path: Path) -> None:
    """Finding 2: the coordinator says ``privacy.dp = false`` (and no noise, and a huge epsilon) to a site
    whose own policy requires epsilon 4: the site trains with DP within 4 all the same."""
    weaken = _asking({"privacy.dp": False, "privacy.epsilon": 900.0, "privacy.noise_multiplier": 0.0})
    cfg = make_config(tmp_path / "run", train__rounds=2, privacy={"dp": False, "budgets": {"finance-1": 4.0}})
    run, seen = _train_replies(cfg, weaken)
    by_site = {}
    for _, ctx, reply in seen:
        by_site.setdefault(int(ctx.node_config["partition-id"]), []).append(reply)
    for reply in by_site[0]:  # finance-1: its own policy
        event = event_from_dict(dict(reply.content["privacy_event"]))
        assert event.noise_multiplier > 0.3 and reply.content["privacy"]["budget_epsilon"] == 4.0
        assert "train_loss" not in reply.content["metrics"]
    for reply in by_site[1]:  # finance-2 has no policy of its own: the coordinator's request decides
        assert "privacy_event" not in reply.content
    ledger = PrivacyLedger.load(run / "privacy_ledger.json")
    assert {e.site for e in ledger.events} == {"finance-1"} and ledger.spent("finance-1", 1e-5) <= 4.0


def test_malicious_coordinator_asking_for_a_larger_delta_is_refused_and_nothing_is_released(make_config, tmp_path: Path) -> None:
    weaken = _asking({"privacy.delta": 0.5})
    cfg = make_config(tmp_path / "run", train__rounds=1, cohorts=ONE_SITE, privacy={"dp": True, "epsilon": 1.0})
    seen = []
    with pytest.raises(FederationError, match="every site of cohort 'finance' failed"):
        run_with(cfg, lambda m, c, r: seen.append(r) or r, weaken)
    trains = [r for r in seen if r.has_error() and "delta 0.5" in r.error.reason]
    assert trains and all(r.error.code == POLICY_REFUSED_CODE for r in trains)
    assert not any(not r.has_error() and "update" in r.content for r in seen)  # no update left the site


def test_malicious_coordinator_cannot_lower_the_noise_it_is_told_is_fixed(make_config, tmp_path: Path) -> None:
    """A requested noise multiplier is a floor: asking for 0.01 leaves the site's calibrated sigma."""
    low = _asking({"privacy.noise_multiplier": 0.01})
    cfg = make_config(tmp_path / "run", train__rounds=1, cohorts=ONE_SITE, privacy={"dp": True, "epsilon": 1.0})
    _, seen = _train_replies(cfg, low)
    assert event_from_dict(dict(seen[0][2].content["privacy_event"])).noise_multiplier > 1.0


def test_policy_takes_the_more_private_of_request_and_policy() -> None:
    ask = PrivacyRequest(dp=True, epsilon=2.0, delta=1e-6, max_grad_norm=1.0, noise_multiplier=0.0, accountant="rdp",
                         grad_sample_mode="hooks", eval_metrics="public")
    eff = effective_privacy(SitePolicy(epsilon=4.0, max_delta=1e-5, eval_metrics="noised"), ask)
    assert (eff.dp, eff.epsilon, eff.delta, eff.eval_metrics) == (True, 2.0, 1e-6, "noised")  # more privacy is taken
    with pytest.raises(PolicyRefused, match="delta 0.001"):
        effective_privacy(SitePolicy(epsilon=4.0, max_delta=1e-5), PrivacyRequest(**{**ask.__dict__, "delta": 1e-3}))
    assert public_size(1234) == 1200 and public_size(96) == 96 and public_size(1234, declared=1000) == 1000


def test_malicious_coordinator_learns_no_exact_size_loss_or_metrics_under_dp(make_config, tmp_path: Path) -> None:
    """Finding 3: under DP nothing leaves a site outside the ledger: the reported size is the public
    (rounded) size, no train loss or timing, and the eval metrics stay at the site by default."""
    cfg = make_config(tmp_path / "run", train__rounds=1, privacy={"dp": True, "epsilon": 4.0}, demo={"examples_per_site": 133})
    replies = []
    run = run_with(cfg, lambda m, c, r: replies.append((m.metadata.message_type, r)) or r)
    trains = [r for kind, r in replies if kind == "train"]
    evals = [r for kind, r in replies if kind == "evaluate"]
    assert trains and evals
    for r in trains:
        assert set(r.content["metrics"]) <= {"num_examples", "steps"}  # no train_loss, no train_seconds
    # the largest site has 133 rows: 27 to evaluate, 106 to train; it reports 110 (2 significant figures)
    sizes = {int(r.content["metrics"]["num_examples"]) for r in trains}
    assert 110 in sizes and 106 not in sizes
    for r in evals:
        assert "metrics" not in r.content and r.content["kept"]["metrics_kept"] is True
    line = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1]
    assert line["cohorts"]["finance"]["train_loss"] is None and line["cohorts"]["finance"]["accuracy"] is None
    # the simulation harness (which runs every site) reads the kept metrics back for its summary
    _, summary = simulate(make_config(tmp_path / "sim", train__rounds=1, privacy={"dp": True, "epsilon": 4.0}), progress=False)
    assert summary["cohorts"]["finance"]["accuracy"] is not None and "not released" in summary["cohorts"]["finance"]["metrics_source"]


def test_noised_eval_metrics_are_charged_to_the_ledger(make_config, tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "run", train__rounds=2, privacy={"dp": True, "epsilon": 4.0, "eval_metrics": "noised"})
    run, summary = simulate(cfg, progress=False)
    ledger = PrivacyLedger.load(run / "privacy_ledger.json")
    kinds = [e.kind for e in ledger.unit_events("finance-1")]
    assert kinds.count("eval_noise") == 3 and kinds.count("dp_sgd") == 2  # rounds 0, 1, 2 evaluated; 2 trained
    site = summary["privacy"]["sites"]["finance-1"]
    assert site["epsilon"] <= 4.0 and ledger.spent("finance-1", site["delta"]) == pytest.approx(site["epsilon"])
    assert summary["cohorts"]["finance"]["accuracy"] is not None  # noised, post-processed, in range
    assert 0.0 <= summary["cohorts"]["finance"]["accuracy"] <= 1.0


def test_every_key_a_site_sends_is_in_the_release_catalogue() -> None:
    from fedlora.privacy.releases import release_catalogue

    names = {r.name for r in release_catalogue({"dp": True}, {"enabled": True})} | {
        r.name for r in release_catalogue({"dp": False}, {"enabled": False})}
    sent = {name for keys in site_releases().values() for name in keys.values()}
    assert sent and sent <= names, sorted(sent - names)


@pytest.mark.parametrize("forge", ["round", "site", "budget"])
def test_malicious_site_forging_its_privacy_event_is_refused_and_named(make_config, tmp_path: Path, forge: str) -> None:
    """Finding 6: the coordinator's ledger holds what sites attest, and only what is consistent."""
    def forged(msg, ctx, reply):
        if msg.metadata.message_type == "train" and ctx.node_config["partition-id"] == 0 and not reply.has_error():
            event = dict(reply.content["privacy_event"])
            status = dict(reply.content["privacy"])
            if forge == "round":
                event["round"] = 77
            elif forge == "site":
                event["site"] = "finance-2"
            else:
                status["budget_epsilon"] = 0.01
            reply.content["privacy_event"], reply.content["privacy"] = ConfigRecord(event), ConfigRecord(status)
        return reply

    cfg = make_config(tmp_path / "run", train__rounds=1, privacy={"dp": True, "epsilon": 4.0})
    run = run_with(cfg, forged)
    line = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1]
    assert line["cohorts"]["finance"]["sites_failed"] == ["finance-1"]
    ledger = PrivacyLedger.load(run / "privacy_ledger.json")
    assert not any(e.round == 77 for e in ledger.events) and len(ledger.site_events("finance-2")) == 1
    assert ledger.site_events("finance-1") == []


def test_renaming_a_site_never_resets_its_spend(tiny_model: Path, tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    from fedlora.simulation import demo_data

    data_file = demo_data.write_cohort(tmp_path / "data", "finance", 1, seed=0, examples_per_site=40, size_skew=0.0, label_skew=1.0)[0]
    spec = ModelSpec(str(tiny_model), 32, "sequence_classification", 4, 8.0, 0.0, ("query", "value"), "standard")
    runtime = get_runtime(spec, "cpu")
    policy = SitePolicy(epsilon=6.0)
    plan = RoundPlan(round=1, cohort="finance", labels=tuple(demo_data.LABELS["finance"]), seed=0, wire_dtype="float32", local_steps=2,
                     local_epochs=0.0, batch_size=8, optimizer="sgd", learning_rate=0.01, weight_decay=0.0, max_grad_norm=0.0,
                     eval_fraction=0.2, rounds=3)
    eff = effective_privacy(policy, PrivacyRequest(True, 6.0, 0.0, 1.0, 0.0, "rdp", "hooks", "site"))
    settings = LocalTrainSettings(2, 0.0, 8, "sgd", 0.01, 0.0, 0.0)
    spent = []
    for round_, name in ((1, "bank-a"), (2, "bank-renamed")):
        site = SiteSpec(name, "finance", str(data_file), state_dir=str(tmp_path / "state"), policy=policy, identity="key:sha256:abc")
        data = site_data(site, list(plan.labels), runtime, 0, 0.2)
        state = runtime.initial_adapter(0, "finance", 3)
        ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})  # a fresh process: only the state folder
        _, event, status = private_round(runtime, RoundPlan(**{**plan.__dict__, "round": round_}), eff, ctx, data.train, state, settings,
                                         site=site, num_labels=3)
        spent.append(status["epsilon_spent"])
    assert spent[1] > spent[0] > 0  # the second name continues the first's spend
    with pytest.raises(PolicyRefused, match="state folder"):
        check_persistence(SiteSpec.from_node_config({"domain": "finance", "data-path": str(data_file), "epsilon": "4"}))


def test_the_readme_table_of_what_the_coordinator_sees_is_the_catalogues() -> None:
    from fedlora.privacy.releases import coordinator_view_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert coordinator_view_table().strip() in readme, "README's 'what the coordinator sees' table is out of date"
