"""The coordinator against malicious sites (DESIGN.md section 7: "a malicious site may send any
bytes"): a real in-process federation whose sites' replies one test site forges after its real
handler made them (``run_with(cfg, intercept)``).

* A forged structure field of a secure sum (sites counted, total weight, loss, counts, a value
  outside the clip range; the eval sum's counts) aborts that cohort's round with the check named
  (``check_sum`` / ``check_eval_sum``); the run goes on, the adapter stays as it was.
* A malformed protocol reply (an unusable key, the wrong number of share ciphertexts, a short
  masked vector, a malformed unmask reply) counts as that site dropping out: it is named in
  ``sites_failed`` with its reason, and the others' sum is used, bit for bit the sum of a run in
  which that site dropped out honestly.
* Unusable clear metrics (negative examples or steps, NaN or negative losses, infinite seconds,
  counts that do not add up) leave that site out of the round, named.
* ``secure_aggregation.clip_range < 1`` is refused.

Cohorts of 3 sites: k = 2 neighbours (everyone), threshold 2, modulus 2^22 (uint32 on the wire).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord

from conftest import run_with
from fedlora.config import ConfigError, SecureAggregationConfig
from fedlora.privacy import eval_release, masking, shamir
from fedlora.privacy.quantization import Quantizer
from fedlora.privacy.secagg_vector import (EVAL_LOSS_SCALE, EVAL_MODULUS_BITS, INT_FIELDS, LOSS_SCALE, ForgedSum, check_eval_sum,
                                           check_sum, eval_vector, read_sum, site_vector)
from fedlora.server.secure_round import (SHARE_CIPHERTEXT_BYTES, key_problem, masked_vector, share_problem, unmask_problem)
from safetensors.numpy import load_file

SECAGG = {"enabled": True, "bits": 20, "clip_range": 1.0}
THREE = {"finance": {"sites": 3}}
MODULUS = 22  # 20 bits + ceil(log2(3 + 1))
LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")  # a point of order 8


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _adapter(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "adapters" / "finance" / "adapter_model.safetensors"))


def _secure(make_config, out: Path, intercept=None, **over) -> Path:
    return run_with(make_config(out, cohorts=THREE, train__rounds=1, secure_aggregation=SECAGG, **over), intercept)


def _forger(stage: str, forge, partition: int = 0):
    """An intercept that passes ``forge(reply)`` for ``stage`` replies of the site ``partition``."""
    def intercept(msg, ctx, reply):
        if msg.metadata.message_type == stage and ctx.node_config["partition-id"] == partition and not reply.has_error():
            forge(reply)
        return reply
    return intercept


def _shift(index: int, delta: int, modulus: int = MODULUS, dtype: str = "<u4"):
    """Add ``delta`` to entry ``index`` of the masked vector (modulo 2^modulus): after unmasking the
    cohort's sum carries the shift, as if the site had put it into its vector."""
    def forge(reply) -> None:
        a = reply.content["masked"]["y"]
        y = np.frombuffer(a.data, dtype=dtype).astype(object)
        y[index] = (y[index] + delta) % 2**modulus
        reply.content["masked"] = ArrayRecord({"y": Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype,
                                                          data=np.array(y.tolist(), dtype=dtype).tobytes())})
    return forge


def _set(record: str, **values):
    def forge(reply) -> None:
        rec = dict(reply.content[record])
        rec.update(values)
        reply.content[record] = ConfigRecord(rec)
    return forge


def _drop_last(record: str, key: str):
    def forge(reply) -> None:
        rec = dict(reply.content[record])
        rec[key] = list(rec[key])[:-1]
        reply.content[record] = ConfigRecord(rec)
    return forge


def _truncate(reply) -> None:
    a = reply.content["masked"]["y"]
    reply.content["masked"] = ArrayRecord({"y": Array(dtype=a.dtype, shape=(a.shape[0] - 1,), stype=a.stype, data=a.data[:-4])})


# ---- forged structure fields of the secure sum: the round aborts, the check named ----------------

@pytest.mark.parametrize("index, delta, check", [
    (-2, 1, "sites counted"),  # reports 4 of 3 sites
    (-(INT_FIELDS + 2), 2**21, "total weight"),  # a weight of about 4 for 3 sites
    (-(INT_FIELDS + 1), -2**20, "mean train loss"),  # a loss far below 0
    (-3, 2**21, "values clipped"),
    (-1, 5, "unclipped updates"),
    (0, 2**21, "value range"),  # one coordinate shifted past the sum of 3 clip ranges
])
def test_malicious_site_forging_a_field_of_the_secure_sum_aborts_the_round_with_the_check_named(
        make_config, tmp_path: Path, index: int, delta: int, check: str) -> None:
    run = _secure(make_config, tmp_path / "run", _forger("train.secagg_masked", _shift(index, delta)))
    before, after = (x["cohorts"]["finance"] for x in _lines(run))
    assert f"check '{check}'" in after["secure_aggregation_aborted"], after["secure_aggregation_aborted"]
    assert after["sites_trained"] == 0 and "train_loss" not in after
    # nothing of the forged sum reached the adapter: it evaluates exactly as the initial one
    assert (after["eval_loss"], after["accuracy"]) == (before["eval_loss"], before["accuracy"])
    assert json.loads((run / "summary.json").read_text())["rounds_completed"] == 1


@pytest.mark.parametrize("index, delta, check", [(1, 1000, "correct <= examples"), (2, 1, "counts sum to examples")])
def test_malicious_site_forging_its_secure_eval_counts_aborts_the_eval_sum_with_the_check_named(
        make_config, tmp_path: Path, index: int, delta: int, check: str) -> None:
    forge = _shift(index, delta, EVAL_MODULUS_BITS, "<u8")
    run = _secure(make_config, tmp_path / "run", _forger("evaluate.secagg_masked", forge))
    for line in _lines(run):
        entry = line["cohorts"]["finance"]
        assert f"check '{check}'" in entry["secure_aggregation_eval_aborted"] and entry["accuracy"] is None
    assert _lines(run)[1]["cohorts"]["finance"]["sites_trained"] == 3  # the train sum is untouched


# ---- malformed protocol replies: that site drops out, named; the others' sum is used ----------------

_REFERENCE: dict[str, dict[str, np.ndarray]] = {}


def _reference(make_config, root: Path, dropped: bool) -> dict[str, np.ndarray]:
    """The adapter after a round in which finance-1 dropped out honestly (an error reply to
    ``train``) or stayed in: the sums any honest dropout at stages 1-3 (or 4) leaves."""
    def lose(msg, ctx, reply):
        if dropped and msg.metadata.message_type == "train" and ctx.node_config["partition-id"] == 0:
            return Message(Error(code=1, reason="connection lost"), reply_to=msg)
        return reply

    key = "dropped" if dropped else "full"
    if key not in _REFERENCE:
        _REFERENCE[key] = _adapter(_secure(make_config, root / f"reference-{key}", lose))
    return _REFERENCE[key]


@pytest.mark.parametrize("stage, forge, reason", [
    ("train", _set("secagg", c_pk=bytes(32)), "all-zero public key"),
    ("train.secagg_share", _drop_last("secagg", "ciphertexts"), "share ciphertexts for"),
    ("train.secagg_masked", _truncate, "masked vector of shape"),
], ids=["zero-key", "share-count", "short-vector"])
def test_malicious_site_with_a_malformed_protocol_reply_drops_out_named_and_the_honest_sum_is_used(
        make_config, tmp_path: Path, stage: str, forge, reason: str) -> None:
    run = _secure(make_config, tmp_path / "run", _forger(stage, forge))
    line = _lines(run)[1]["cohorts"]["finance"]
    assert "secure_aggregation_aborted" not in line
    assert line["sites_trained"] == 2 and line["sites_failed"] == ["finance-1"]
    assert reason in line["sites_failed_reasons"]["finance-1"] and stage in line["sites_failed_reasons"]["finance-1"]
    want = _reference(make_config, tmp_path, dropped=True)
    got = _adapter(run)
    assert all(np.array_equal(got[k], want[k]) for k in want)  # exactly the two honest sites' sum


def test_malicious_site_with_a_malformed_unmask_reply_has_its_shares_left_out_and_is_named(make_config, tmp_path: Path) -> None:
    """Its masked vector is in; the two honest sites' shares still reach the threshold 2 for every
    secret, so the sum of all three is unmasked, and the site is named."""
    run = _secure(make_config, tmp_path / "run", _forger("train.secagg_unmask", _drop_last("secagg", "y")))
    line = _lines(run)[1]["cohorts"]["finance"]
    assert "secure_aggregation_aborted" not in line and line["sites_trained"] == 3 and line["sites_failed"] == ["finance-1"]
    assert "train.secagg_unmask: malformed reply" in line["sites_failed_reasons"]["finance-1"]
    want = _reference(make_config, tmp_path, dropped=False)
    assert all(np.array_equal(_adapter(run)[k], want[k]) for k in want)


def test_malicious_sites_leaving_too_few_usable_keys_abort_the_round_and_are_all_named(make_config, tmp_path: Path) -> None:
    def forge(msg, ctx, reply):
        if msg.metadata.message_type == "train" and ctx.node_config["partition-id"] in (0, 1) and not reply.has_error():
            _set("secagg", s_pk=LOW_ORDER if ctx.node_config["partition-id"] == 0 else b"\x01" * 31)(reply)
        return reply

    run = _secure(make_config, tmp_path / "run", forge)
    line = _lines(run)[1]["cohorts"]["finance"]
    assert "only 1 site(s) advertised usable keys; the threshold is 2" in line["secure_aggregation_aborted"]
    assert line["sites_failed"] == ["finance-1", "finance-2"] and line["sites_trained"] == 0
    assert "low-order" in line["sites_failed_reasons"]["finance-1"] and "31 bytes" in line["sites_failed_reasons"]["finance-2"]


# ---- clear metrics ----------------------------------------------------------------------------------

TRAIN_FORGERIES = {1: ("num_examples", -5), 2: ("train_loss", float("nan")), 3: ("train_loss", -913.0), 4: ("steps", -3),
                   5: ("train_seconds", float("inf"))}


def test_malicious_site_sending_unusable_clear_metrics_is_left_out_of_each_round_and_named(make_config, tmp_path: Path) -> None:
    """Round r forges one field of finance-1's train metrics (``TRAIN_FORGERIES``); the evaluations
    of rounds 0 and 5 forge its eval metrics (examples that are not the sum of its counts, a NaN
    accuracy). Each time the site is left out and named; the run completes with finite figures."""
    def forge(msg, ctx, reply):
        if ctx.node_config["partition-id"] != 0 or reply.has_error():
            return reply
        kind, round_ = msg.metadata.message_type, int(msg.metadata.group_id)
        if kind == "train" or kind == "evaluate":
            rec = dict(reply.content["metrics"])
            field, value = TRAIN_FORGERIES[round_] if kind == "train" else (("num_examples", 10**6) if round_ == 0 else ("accuracy", math.nan))
            rec[field] = value
            reply.content["metrics"] = MetricRecord(rec)
        return reply

    cfg = make_config(tmp_path / "run", cohorts={"finance": {"sites": 2}}, train__rounds=5, train__eval_every=5,
                      secure_aggregation={"enabled": False})
    run = run_with(cfg, forge)
    lines = _lines(run)
    for line in lines[1:]:
        entry, (field, _) = line["cohorts"]["finance"], TRAIN_FORGERIES[line["round"]]
        assert entry["sites_failed"] == ["finance-1"] and entry["sites_trained"] == 1, entry
        assert "rejected" in entry["sites_failed_reasons"]["finance-1"]
        assert math.isfinite(entry["train_loss"]) and entry["train_loss"] >= 0 and math.isfinite(entry["site_train_seconds"])
    for line, what in ((lines[0], "label counts sum to"), (lines[5], "accuracy of nan")):
        entry = line["cohorts"]["finance"]
        assert entry["eval_sites_failed"] == ["finance-1"] and what in entry["eval_sites_failed_reasons"]["finance-1"], entry
        assert 0 <= entry["accuracy"] <= 1 and entry["eval_examples"] < 40  # finance-2's own eval set only
    assert json.loads((run / "summary.json").read_text())["rounds_completed"] == 5


# ---- the checks themselves (pure) ----------------------------------------------------------------------

def _train_sum(q: Quantizer, weights=(1.0, 0.25, 0.04), losses=(3.7, 0.0, 80.0)) -> np.ndarray:
    rng = np.random.default_rng(0)
    total = np.zeros(12 + 2 + INT_FIELDS, dtype=np.uint64)
    for w, loss in zip(weights, losses):
        v, _ = site_vector({"a": rng.uniform(-1, 1, size=12)}, w, loss, q, unclipped=1)
        total = masking.add(total, v, q.modulus_bits)
    return total


def test_malicious_sums_fail_the_sum_checks_and_honest_sums_pass() -> None:
    q = Quantizer(clip_range=1.0, bits=20, modulus_bits=22)
    honest = _train_sum(q)
    check_sum(honest, 3, q)
    got = read_sum(honest, {"a": (12,)}, q, survivors=3)
    assert 0 <= got.mean_loss <= LOSS_SCALE and got.sites == 3 and got.unclipped == 3
    check_sum(_train_sum(q, weights=(1.0, 1.0, 1.0), losses=(LOSS_SCALE, LOSS_SCALE, 1e9)), 3, q)  # the extremes pass
    check_sum(_train_sum(q, weights=(0.001, 0.001, 0.001), losses=(0.0, 0.0, 0.0)), 3, q)
    clipped = honest.copy()
    clipped[-3] = 3 * 14  # every value of every site clipped: still honest
    check_sum(clipped, 3, q)
    top, values = 2**q.bits - 1, 12 + 2
    for index, delta, check in ((-2, 1, "sites counted"), (-2, -1, "sites counted"), (-5, 2 * top, "total weight"),
                                (-5, -int(honest[-5]), "total weight"), (-4, -top, "mean train loss"), (-4, 2 * top, "mean train loss"),
                                (-3, 3 * values + 1, "values clipped"), (-1, 1, "unclipped updates"),
                                (3, 3 * top + 1 - int(honest[3]), "value range")):
        forged = honest.copy()
        forged[index] = (int(forged[index]) + delta) % 2**q.modulus_bits
        with pytest.raises(ForgedSum, match=f"check '{check}'"):
            check_sum(forged, 3, q)
    with pytest.raises(ForgedSum, match="counts 3 site.s. but 2 survived"):
        read_sum(honest, {"a": (12,)}, q, survivors=2)
    with pytest.raises(ForgedSum, match="adapter's layout"):
        read_sum(honest, {"a": (11,)}, q, survivors=3)


def test_malicious_eval_sums_fail_the_eval_checks_and_honest_noised_sums_pass() -> None:
    exact = [eval_vector(0.7, 5, 8, [3, 5]), eval_vector(2.0, 0, 4, [4, 0]), eval_vector(0.0, 9, 9, [0, 9])]
    total = np.zeros(5, dtype=np.uint64)
    for v in exact:
        total = masking.add(total, v, EVAL_MODULUS_BITS)
    check_eval_sum(total, noised=False)
    for index, delta, check in ((1, 100, "correct <= examples"), (2, 1, "counts sum to examples"), (3, -1, "counts sum to examples"),
                                (0, -10**12, "non-negative sums")):
        forged = total.copy()
        forged[index] = np.uint64((int(forged[index]) + delta) % 2**64)
        with pytest.raises(ForgedSum, match=f"check '{check}'"):
            check_eval_sum(forged, noised=False)
    # heavy honest DP noise: negative examples and correct above n are what honest noised sums look like
    rng = np.random.default_rng(3)
    noised = np.zeros(5, dtype=np.uint64)
    for v in ([0.5, 1.0, 1.0, 2.0], [0.1, 0.0, 3.0, 0.0], [0.0, 2.0, 0.0, 2.0]):
        noised = masking.add(noised, eval_release.integer_vector(eval_release.noised(np.array(v), 20.0, rng), EVAL_LOSS_SCALE),
                             EVAL_MODULUS_BITS)
    check_eval_sum(noised, noised=True)
    forged = noised.copy()
    forged[2] = np.uint64((int(forged[2]) + 1) % 2**64)
    with pytest.raises(ForgedSum, match="check 'counts sum to examples'"):
        check_eval_sum(forged, noised=True)


def test_malicious_replies_are_named_by_the_stage_checks() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    good = X25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_problem(good) == ""
    assert "all-zero" in key_problem(bytes(32)) and "31 bytes" in key_problem(good[:31]) and "low-order" in key_problem(LOW_ORDER)
    blob = bytes(SHARE_CIPHERTEXT_BYTES)
    assert share_problem((2, 3), (blob, blob), [3, 2]) == ""
    assert "1 share ciphertexts for 2 peers" in share_problem((2, 3), (blob,), [2, 3])
    assert "expected one for each" in share_problem((2, 2), (blob, blob), [2, 3])
    assert "expected one for each" in share_problem((2, 4), (blob, blob), [2, 3])
    assert "bytes, not" in share_problem((2, 3), (blob, blob[:-1]), [2, 3])
    wire = np.dtype("uint32")
    ok = np.arange(4, dtype="<u4")
    assert np.array_equal(masked_vector(Array(dtype="uint32", shape=(4,), stype="x", data=ok.tobytes()), 4, wire, 22), ok)
    for arr, what in ((Array(dtype="uint64", shape=(2,), stype="x", data=ok.tobytes()), "dtype uint64"),
                      (Array(dtype="uint32", shape=(3,), stype="x", data=ok[:3].tobytes()), "shape (3,)"),
                      (Array(dtype="uint32", shape=(4,), stype="x", data=np.array([0, 0, 0, 2**22], "<u4").tobytes()), "modulus")):
        with pytest.raises(ValueError, match=what.replace("(", r"\(").replace(")", r"\)")):
            masked_vector(arr, 4, wire, 22)
    share = bytes(shamir.SHARE_BYTES)
    allowed = {1: "b", 2: "b", 3: "sk"}
    assert unmask_problem((1, 3), ("b", "sk"), (1, 2), (share, share), allowed, 4) == ""
    assert "2 peers, 2 kinds, 2 indices and 1 shares" in unmask_problem((1, 3), ("b", "sk"), (1, 2), (share,), allowed, 4)
    assert "allows only as 'sk'" in unmask_problem((3,), ("b",), (1,), (share,), allowed, 4)  # both secrets of a dropped site
    assert "allows only as None" in unmask_problem((9,), ("b",), (1,), (share,), allowed, 4)
    assert "index 7" in unmask_problem((1,), ("b",), (7,), (share,), allowed, 4)
    assert "more than one share" in unmask_problem((1, 1), ("b", "b"), (1, 2), (share, share), allowed, 4)


def test_malicious_clip_range_below_one_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"secure_aggregation.clip_range = 0.5: must be >= 1: each site's weight w"):
        SecureAggregationConfig(clip_range=0.5)
    assert SecureAggregationConfig(clip_range=1.0).clip_range == 1.0 and SecureAggregationConfig(clip_range=4).clip_range == 4
