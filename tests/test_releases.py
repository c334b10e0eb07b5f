"""The catalogue of releases: every release under one status, and under DP nothing unaccounted reaches the coordinator."""

from __future__ import annotations

import itertools

import pytest

from fedlora.privacy_config import PrivacyConfig, SecureAggregationConfig

from fedlora.privacy.releases import (LABELS, MESSAGES, SEED_REASON, SETTINGS, STATUSES, Release, coordinator_view_table,
                                      release_catalogue, visible_to_coordinator)


def _by_name(privacy: dict, secagg: dict | None = None, **kw) -> dict[str, Release]:
    cat = release_catalogue(privacy, {} if secagg is None else secagg, **kw)
    assert [r.name for r in cat] == list(LABELS), "every release id once, in order, in every setting"
    return {r.name: r for r in cat}


ALL_SETTINGS = [({"dp": dp, "eval_metrics": ev, "client_dp": cdp, "adaptive_clip": cdp and ad, "client_noise": cn,
                  "reproducible_noise": rep}, {"enabled": sa, "metrics": m})
                for dp, ev, cdp, ad, cn, rep, sa, m in itertools.product((False, True), ("noised", "site", "public"), (False, True),
                                                                        (False, True), ("coordinator", "sites"), (False, True),
                                                                        (False, True), ("secure", "clear", "none"))]


@pytest.mark.parametrize("privacy,secagg", ALL_SETTINGS[::7])
def test_every_release_has_one_known_status_message_and_label(privacy: dict, secagg: dict) -> None:
    for r in _by_name(privacy, secagg).values():
        assert r.status in STATUSES and r.message in MESSAGES and r.name.split(".")[0] in (r.message, "privacy")
        assert r.covered_by and r.what
        assert (r.visibility == "none") == (r.status == "not released")


def test_under_dp_nothing_reaches_the_coordinator_unless_accounted_or_declared_public() -> None:
    """Threat-model rule 3, over every setting with DP on and secret noise, unless the site's own
    policy releases eval metrics in public (then exactly that release, and only it, is outside)."""
    checked = 0
    for privacy, secagg in ALL_SETTINGS:
        if not privacy["dp"] or privacy["reproducible_noise"]:
            continue
        for r in release_catalogue(privacy, secagg):
            if r.visibility == "none":
                continue
            checked += 1
            if r.status == "no guarantee":
                assert r.name == "evaluate.metrics" and privacy["eval_metrics"] == "public" and r.covered_by == "policy.eval_metrics = public"
            else:
                assert r.status in ("accounted", "declared public"), r
    assert checked > 100


def test_dp_on_accounts_the_update_and_noised_eval_metrics_and_keeps_loss_and_time_at_the_site() -> None:
    c = _by_name({"dp": True, "eval_metrics": "noised"})  # secure aggregation on by default
    assert (c["train.update"].status, c["train.update"].covered_by, c["train.update"].visibility) == ("accounted", "dp_sgd", "cohort sum")
    assert "only the cohort's sum" in c["train.update"].what
    assert (c["train.size"].status, c["train.size"].covered_by) == ("declared public", "policy.public_size")
    assert "never the exact" in c["train.size"].what and "2 significant figures" in c["train.size"].what
    assert c["train.plan"].status == "declared public" and "public size" in c["train.plan"].what
    assert c["privacy.event"].status == c["privacy.status"].status == "declared public"
    assert c["train.loss"].status == c["train.seconds"].status == "not released"
    ev = c["evaluate.metrics"]
    assert (ev.status, ev.covered_by, ev.visibility) == ("accounted", "eval_noise", "cohort sum") and "0.1" in ev.note
    assert _by_name({"dp": True, "eval_metrics": "noised", "eval_budget_fraction": 0.25})["evaluate.metrics"].note == \
        "uses 0.25 of the site's budget"
    assert c["secagg.masked"].status == "accounted" and c["secagg.masked"].visibility == "cohort sum"
    assert c["secagg.keys"].status == c["secagg.shares"].status == c["secagg.unmask"].status == "declared public"
    assert c["query.identity"].status == "declared public"
    assert c["train.client_clip_bit"].status == "not released" and c["evaluate.kept"].status == "not released"


def test_missing_keys_take_the_run_configs_defaults() -> None:
    assert _by_name({"dp": True}) == _by_name({"dp": True, "eval_metrics": PrivacyConfig.eval_metrics},
                                              {"enabled": SecureAggregationConfig.enabled, "metrics": SecureAggregationConfig.metrics})
    assert _by_name({})["train.update"].status == ("accounted" if PrivacyConfig.dp else "no guarantee")


def test_eval_metrics_site_keeps_them_and_public_lists_them_outside_the_guarantee() -> None:
    site = _by_name({"dp": True, "eval_metrics": "site"})
    assert site["evaluate.metrics"].status == "not released" and site["evaluate.kept"].status == "declared public"
    pub = _by_name({"dp": True, "eval_metrics": "public"}, {"enabled": False})["evaluate.metrics"]
    assert (pub.status, pub.visibility, pub.covered_by) == ("no guarantee", "per site", "policy.eval_metrics = public")
    with pytest.raises(ValueError, match="privacy.eval_metrics.*'loud'"):
        release_catalogue({"dp": True, "eval_metrics": "loud"}, {})


def test_dp_off_releases_exactly_and_with_no_guarantee() -> None:
    c = _by_name({"dp": False}, {"enabled": False})
    for name in ("train.update", "train.size", "train.loss", "train.seconds", "evaluate.metrics"):
        assert c[name].status == "no guarantee" and c[name].visibility == "per site", name
    assert "exact" in c["train.size"].what
    s = _by_name({"dp": False}, {})  # DP off (no longer the default), secure aggregation on by default
    assert s["train.update"].visibility == "cohort sum" and s["train.update"].status == "no guarantee"
    assert s["train.seconds"].status == "not released" and s["secagg.masked"].status == "no guarantee"
    assert c["privacy.event"].status == "not released" and c["secagg.keys"].status == "not released"  # not sent


def test_a_site_with_its_own_budget_is_dp_on_whatever_the_run_says() -> None:
    privacy = {"dp": False, "budgets": {"bank-1": 4.0}}
    assert _by_name(privacy, site="bank-1")["train.update"].status == "accounted"
    assert _by_name(privacy, site="bank-2")["train.update"].status == "no guarantee"


def test_reproducible_noise_turns_every_accounted_release_into_no_guarantee_with_the_reason() -> None:
    plain, seeded = _by_name({"dp": True, "eval_metrics": "noised"}), _by_name({"dp": True, "eval_metrics": "noised", "reproducible_noise": True})
    accounted = [n for n, r in plain.items() if r.status == "accounted"]
    assert accounted
    for n in accounted:
        assert seeded[n].status == "no guarantee" and seeded[n].note == SEED_REASON
    assert all(seeded[n] == plain[n] for n in plain if n not in accounted)
    assert "knows the run's seed" in SEED_REASON


def test_adaptive_clipping_bit_and_client_level_noise_shares() -> None:
    c = _by_name({"dp": True, "client_dp": True, "adaptive_clip": True})
    assert (c["train.client_clip_bit"].status, c["train.client_clip_bit"].covered_by) == ("accounted", "client_dp")
    shares = _by_name({"dp": False, "client_dp": True, "client_noise": "sites"}, {"enabled": True})["train.update"]
    assert (shares.status, shares.covered_by) == ("accounted", "client_dp") and "one whole site" in shares.note
    central = _by_name({"dp": False, "client_dp": True, "client_noise": "coordinator"}, {"enabled": True})["train.update"]
    assert central.status == "no guarantee" and "coordinator" in central.note


def test_visible_to_coordinator_is_what_is_not_kept_at_the_site() -> None:
    dp = visible_to_coordinator({"dp": True}, {"enabled": True})
    assert ("train", _by_name({"dp": True}, {"enabled": True})["train.update"].what) in dp
    assert not any("training loss" in what for _, what in dp) and not any("wall time" in what for _, what in dp)
    off = visible_to_coordinator({"dp": False}, {"enabled": False})
    assert any("training loss" in what for _, what in off) and any("exact number of training records" in w for _, w in off)
    assert "secagg" not in {m for m, _ in off} and "secagg" in {m for m, _ in dp}  # nothing of a protocol that did not run


def test_the_coordinator_view_table_has_one_row_per_release_and_agrees_with_the_catalogue() -> None:
    table = coordinator_view_table()
    lines = table.strip().splitlines()
    assert [label for label, _, _ in SETTINGS] == ["DP off, SecAgg off", "DP off, SecAgg on", "DP on, SecAgg off", "DP on, SecAgg on"]
    assert all(line.count("|") == 2 + 4 + 1 for line in lines), "every row has message, release and 4 settings"
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:-1]] for line in lines[2:]}
    assert rows["adapter update"] == ["per site: no guarantee", "cohort sum: no guarantee", "per site: accounted (dp_sgd)",
                                      "cohort sum: accounted (dp_sgd)"]
    assert rows["train loss"][2:] == ["nothing", "nothing"] and rows["train loss"][0] == "per site: no guarantee"
    assert rows["training-set size"][2] == "per site: declared public"
    assert rows["masked vector"][0] == "nothing" and rows["masked vector"][3] == "cohort sum: accounted (dp_sgd)"
    assert len(rows) == len(LABELS) and rows['"metrics kept" flag'][2] == "per site: declared public"


def test_every_key_the_protocol_tags_is_a_release_of_the_catalogue() -> None:
    from fedlora.protocol import site_releases

    tagged = {name for keys in site_releases().values() for name in keys.values()}
    assert tagged and tagged <= set(LABELS), sorted(tagged - set(LABELS))


def test_a_release_with_a_bad_status_or_inconsistent_visibility_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="'train.x'.*unknown status 'public'"):
        Release("train.x", "train", "x", "public", "policy.x")
    with pytest.raises(ValueError, match="disagree"):
        Release("train.x", "train", "x", "not released", "kept", "per site")
