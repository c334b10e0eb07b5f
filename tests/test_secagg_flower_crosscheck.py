"""Cross-check: our SecAgg+ and Flower's legacy SecAgg+ (SecAggPlusWorkflow + secaggplus_mod) on
the same inputs give the same example-weighted mean, within their quantisation bounds, with
and without a site vanishing after it shared its keys; ours sends fewer bytes up."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedlora.config import SecureAggregationConfig
from fedlora.simulation.secagg_compare import WEIGHT_CAP, run_flower, run_ours


@pytest.mark.parametrize("dropout", [0.0, 1 / 6])
def test_ours_and_flowers_secagg_plus_agree_on_the_same_inputs(dropout: float) -> None:
    logging.getLogger("flwr").setLevel(logging.ERROR)
    rng = np.random.default_rng(3)
    n, d = 6, 2000
    updates = [rng.normal(0, 0.05, d).astype(np.float32) for _ in range(n)]
    examples = [int(x) for x in rng.integers(50, 500, n)]
    cfg = SecureAggregationConfig(bits=20, clip_range=1.0)
    ours, flower = run_ours(updates, examples, cfg, dropout=dropout), run_flower(updates, examples, cfg, dropout=dropout)
    kept = range(round(dropout * n), n)  # the first sites vanish at the masked-input stage
    weights = [examples[i] for i in kept]
    plain = sum(examples[i] * updates[i].astype(np.float64) for i in kept) / sum(weights)
    # each site's weighted value is off by at most one quantisation step (value and weight), summed
    # over the sites and divided by the sum of the weights w = n / 1000
    step = 2 * cfg.clip_range / (2**cfg.bits - 1)
    bound = 2 * len(weights) * step / (sum(weights) / WEIGHT_CAP)
    assert ours.mean is not None and flower.mean is not None
    assert np.max(np.abs(ours.mean - plain)) <= bound
    assert np.max(np.abs(flower.mean - plain)) <= bound
    assert np.max(np.abs(ours.mean - flower.mean)) <= 2 * bound
    assert ours.per_site(ours.bytes_up) < flower.per_site(flower.bytes_up)
