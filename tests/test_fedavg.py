from __future__ import annotations

import numpy as np
import pytest

from fedlora.strategies import FedAvg, SiteUpdate
from fedlora.strategies.fedavg import weighted_mean


def test_fedavg_matches_hand_computed_values() -> None:
    g = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([0.5], dtype=np.float32)}
    ups = [
        SiteUpdate("a", {"w": np.array([1.0, 0.0], np.float32), "b": np.array([2.0], np.float32)}, 1.0),
        SiteUpdate("b", {"w": np.array([0.0, 3.0], np.float32), "b": np.array([-1.0], np.float32)}, 3.0),
    ]
    # mean delta w = (1*[1,0] + 3*[0,3]) / 4 = [0.25, 2.25]; b = (2 - 3) / 4 = -0.25
    out = FedAvg().aggregate(g, ups)
    np.testing.assert_allclose(out["w"], [1.25, 4.25])
    np.testing.assert_allclose(out["b"], [0.25])
    assert g["w"].tolist() == [1.0, 2.0], "the global state must not be mutated"
    out2 = FedAvg(server_learning_rate=2.0).aggregate(g, ups)
    np.testing.assert_allclose(out2["w"], [1.5, 6.5])


def test_fedavg_does_not_depend_on_reply_order() -> None:
    rng = np.random.default_rng(0)
    ups = [SiteUpdate(f"s{i}", {"x": rng.normal(size=1000).astype(np.float32)}, float(rng.integers(1, 50))) for i in range(7)]
    a = weighted_mean(ups)["x"]
    b = weighted_mean(list(reversed(ups)))["x"]
    assert np.array_equal(a, b)


def test_fedavg_refuses_empty_or_zero_weight() -> None:
    with pytest.raises(ValueError, match="no updates"):
        weighted_mean([])
    with pytest.raises(ValueError, match="positive"):
        weighted_mean([SiteUpdate("a", {"x": np.zeros(2)}, 0.0)])
