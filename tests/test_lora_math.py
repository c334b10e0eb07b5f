from __future__ import annotations

import numpy as np

from fedlora.strategies import FedAvg, SiteUpdate
from fedlora.strategies.lora_math import lora_delta, mean_of_products, product_of_means


def test_frozen_a_aggregation_equals_the_average_of_the_products() -> None:
    rng = np.random.default_rng(3)
    out_f, in_f, r, scale = 12, 10, 3, 2.0
    a = rng.normal(size=(r, in_f))  # shared, frozen
    b0 = np.zeros((out_f, r), dtype=np.float32)
    bs = [rng.normal(size=(out_f, r)).astype(np.float32) for _ in range(4)]
    w = [5.0, 1.0, 2.0, 8.0]
    # FedAvg on B's updates (B_k - B_0), as the coordinator does
    agg = FedAvg().aggregate({"B": b0}, [SiteUpdate(f"s{i}", {"B": bk - b0}, wk) for i, (bk, wk) in enumerate(zip(bs, w))])
    np.testing.assert_allclose(lora_delta(agg["B"], a, scale), mean_of_products(bs, [a] * 4, w, scale), rtol=1e-5, atol=1e-6)


def test_averaging_a_and_b_separately_is_not_the_average_of_the_products() -> None:
    rng = np.random.default_rng(4)
    bs = [rng.normal(size=(6, 2)) for _ in range(3)]
    as_ = [rng.normal(size=(2, 5)) for _ in range(3)]
    gap = np.abs(product_of_means(bs, as_, [1, 1, 1], 1.0) - mean_of_products(bs, as_, [1, 1, 1], 1.0)).max()
    assert gap > 0.1
