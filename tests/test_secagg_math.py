"""Secure-aggregation building blocks tested like math: quantisation bounds, Shamir, masks."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.privacy import masking, shamir
from fedlora.privacy.quantization import Quantizer
from fedlora.privacy.secagg_vector import (EVAL_LOSS_SCALE, EVAL_MODULUS_BITS, INT_FIELDS, LOSS_SCALE, eval_vector, read_eval_sum,
                                           read_sum, site_vector)


@settings(max_examples=60, deadline=None)
@given(sites=st.integers(1, 40), bits=st.integers(4, 24), r=st.floats(0.01, 100.0), d=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_recovered_sum_is_within_the_documented_bound(sites: int, bits: int, r: float, d: int, seed: int) -> None:
    q = Quantizer(clip_range=r, bits=bits, modulus_bits=min(64, bits + 8))
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-r, r, size=d) for _ in range(sites)]
    total = np.zeros(d, dtype=np.uint64)
    for x in xs:
        v, clipped = q.quantize(x)
        assert clipped == 0 and v.dtype == q.wire_dtype and int(v.max()) <= 2**bits - 1
        total = masking.add(total, v, q.modulus_bits)
    got = q.dequantize_sum(total, sites)
    assert np.max(np.abs(got - np.sum(xs, axis=0))) <= q.error_bound(sites) * (1 + 1e-9) + 1e-9 * r * sites


def test_values_beyond_the_range_are_clipped_and_counted_never_wrapped() -> None:
    q = Quantizer(clip_range=1.0, bits=8, modulus_bits=16)
    v, clipped = q.quantize(np.array([5.0, -7.0, 0.5, 1.0]))
    assert clipped == 2 and v[0] == 255 and v[1] == 0
    assert q.dequantize_sum(v.astype(np.uint64), 1)[:2].tolist() == [1.0, -1.0]
    with pytest.raises(ValueError, match="NaN"):
        q.quantize(np.array([0.0, np.nan]))


def test_overflow_prone_configs_are_rejected_and_wire_types_are_the_smallest() -> None:
    q = Quantizer(clip_range=1.0, bits=16, modulus_bits=20)
    assert q.max_sites() == (2**20 - 1) // (2**16 - 1) == 16
    q.check_no_overflow(16)
    with pytest.raises(ValueError, match="17 sites"):
        q.check_no_overflow(17)
    assert [Quantizer(1.0, 4, m).wire_dtype for m in (8, 9, 16, 17, 32, 33, 64)] == [
        np.uint8, np.uint16, np.uint16, np.uint32, np.uint32, np.uint64, np.uint64]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), data=st.data())
def test_any_threshold_shares_reconstruct_the_secret(n: int, data) -> None:
    t = data.draw(st.integers(1, n))
    secret = os.urandom(32)
    shares = shamir.split(secret, t, n)
    subset = data.draw(st.permutations(shares))[:t]
    assert shamir.combine(subset, t) == secret
    if t > 1:
        with pytest.raises(ValueError, match=f"need {t} distinct shares"):
            shamir.combine(subset[: t - 1], t)


def test_fewer_shares_than_the_threshold_interpolate_to_something_else() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, 5)
    try:  # treating 2 shares as enough yields a field element unrelated to the secret (almost surely > 256 bits)
        wrong = shamir.combine(shares[:2], 2)
    except ValueError as e:
        assert "do not reconstruct" in str(e)
    else:
        assert wrong != secret


def test_masks_are_deterministic_per_seed_uniform_and_cancel() -> None:
    a, b = os.urandom(32), os.urandom(32)
    m1, m2 = masking.mask(a, 100_000, 20), masking.mask(a, 100_000, 20)
    assert np.array_equal(m1, m2) and not np.array_equal(m1, masking.mask(b, 100_000, 20))
    assert int(m1.max()) < 2**20
    counts = np.bincount((m1 >> np.uint64(16)).astype(np.int64), minlength=16)  # top 4 bits: 16 equal bins
    chi2 = float(np.sum((counts - 100_000 / 16) ** 2 / (100_000 / 16)))
    assert chi2 < 50  # 15 degrees of freedom: p < 1e-5 beyond 50
    x = np.arange(1000, dtype=np.uint64)
    masked = masking.add(x, masking.mask(a, 1000, 20), 20)
    assert np.array_equal(masking.sub(masked, masking.mask(a, 1000, 20), 20), x)
    with pytest.raises(ValueError, match="32 bytes"):
        masking.mask(b"short", 4, 20)


@settings(max_examples=40, deadline=None)
@given(sites=st.integers(1, 30), labels=st.integers(2, 6), seed=st.integers(0, 2**32 - 1))
def test_eval_metrics_sum_to_the_example_weighted_means(sites: int, labels: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    per_site = []
    total = np.zeros(3 + labels, dtype=np.uint64)
    for _ in range(sites):
        n = int(rng.integers(1, 5000))
        counts = rng.multinomial(n, np.ones(labels) / labels)
        loss, correct = float(rng.uniform(0, 20)), int(rng.integers(0, n + 1))
        per_site.append((loss, correct, n, counts))
        total = masking.add(total, eval_vector(loss, correct, n, counts), EVAL_MODULUS_BITS)
    got = read_eval_sum(total, sites)
    n_all = sum(p[2] for p in per_site)
    assert got.examples == n_all and got.sites == sites
    assert got.accuracy == sum(p[1] for p in per_site) / n_all
    assert np.array_equal(got.label_counts, np.sum([p[3] for p in per_site], axis=0))
    # each site's loss sum is rounded to a millionth: the mean is off by at most sites / (2e6 n)
    assert abs(got.eval_loss - sum(p[0] * p[2] for p in per_site) / n_all) <= sites / (2 * EVAL_LOSS_SCALE * n_all) + 1e-12


def test_train_vector_reads_back_the_weighted_mean_loss_counts_and_bits() -> None:
    q = Quantizer(clip_range=1.0, bits=20, modulus_bits=24)
    shapes = {"b": (2, 3), "a": (4,)}
    rng = np.random.default_rng(0)
    sites = [({k: rng.uniform(-0.5, 0.5, size=s) for k, s in shapes.items()}, w, loss, bit)
             for w, loss, bit in ((1.0, 3.7, 1), (0.25, 0.9, 0), (0.5, 80.0, 1))]  # a loss above the cap of 64
    total = np.zeros(sum(int(np.prod(s)) for s in shapes.values()) + 2 + INT_FIELDS, dtype=np.uint64)
    for delta, w, loss, bit in sites:
        v, clipped = site_vector(delta, w, loss, q, unclipped=bit)
        assert clipped == 0
        total = masking.add(total, v, q.modulus_bits)
    got = read_sum(total, shapes, q)
    wsum = sum(w for _, w, _, _ in sites)
    assert got.sites == 3 and got.unclipped == 2 and got.clipped == 0 and got.weight == pytest.approx(wsum, abs=3 * q.step)
    want_loss = sum(w * min(loss, LOSS_SCALE) for _, w, loss, _ in sites) / wsum
    assert got.mean_loss == pytest.approx(want_loss, abs=LOSS_SCALE * 4 * q.error_bound(3) / wsum)
    for k in shapes:
        want = sum(w * d[k] for d, w, _, _ in sites) / wsum
        assert np.max(np.abs(got.mean_delta[k] - want)) <= 2 * q.error_bound(3) / wsum
