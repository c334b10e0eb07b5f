"""A site's last DP release is replayed only for the very same request (same cohort, round,
seed and global adapter), survives a process restart (state folder), and a crash between its
two files leaves a consistent pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedlora.client.release_cache import ReleaseCache, request_digest
from fedlora.client.trainer import TrainResult


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"b.lora_B.weight": rng.normal(size=(4, 2)).astype(np.float32), "a.lora_A.weight": rng.normal(size=(2, 4)).astype(np.float32)}


def test_replayed_only_for_the_same_request_and_after_a_restart(tmp_path: Path) -> None:
    g = _state(0)
    d = request_digest(g, cohort="finance", round_=3, seed=7)
    assert d == request_digest({k: v.copy() for k, v in reversed(list(g.items()))}, cohort="finance", round_=3, seed=7)
    other = {k: v.copy() for k, v in g.items()}
    other["b.lora_B.weight"][0, 0] = np.nextafter(other["b.lora_B.weight"][0, 0], np.float32(10))  # one ulp
    for changed in (request_digest(other, cohort="finance", round_=3, seed=7), request_digest(g, cohort="finance", round_=4, seed=7),
                    request_digest(g, cohort="medical", round_=3, seed=7), request_digest(g, cohort="finance", round_=3, seed=8)):
        assert changed != d
    result = TrainResult(_state(1), 0.5, 4, 40, 1.25)
    event = {"kind": "dp_sgd", "round": 3}
    ReleaseCache("finance-1", tmp_path).put(d, result, event)
    again = ReleaseCache("finance-1", tmp_path).get(d)  # a new process: from the state folder
    assert again is not None and again[1] == event
    assert list(again[0].delta) == list(result.delta)
    for k in result.delta:
        np.testing.assert_array_equal(again[0].delta[k], result.delta[k])
    assert (again[0].train_loss, again[0].steps, again[0].num_examples) == (0.5, 4, 40)
    assert ReleaseCache("finance-1", tmp_path).get(request_digest(other, cohort="finance", round_=3, seed=7)) is None
    # the next release replaces it; only one arrays file is kept
    d2 = request_digest(g, cohort="finance", round_=4, seed=7)
    ReleaseCache("finance-1", tmp_path).put(d2, TrainResult(_state(2), 0.4, 4, 40, 1.0), {"round": 4})
    assert ReleaseCache("finance-1", tmp_path).get(d) is None and ReleaseCache("finance-1", tmp_path).get(d2) is not None
    assert len(list(tmp_path.glob("last_release.*.safetensors"))) == 1


def test_without_a_state_folder_the_release_is_kept_in_memory() -> None:
    g = _state(3)
    d = request_digest(g, cohort="retail", round_=1, seed=0)
    cache = ReleaseCache("retail-mem", None)
    assert cache.get(d) is None
    cache.put(d, TrainResult(_state(4), 0.1, 1, 8, 0.1), {"round": 1})
    assert ReleaseCache("retail-mem", None).get(d) is not None
    assert ReleaseCache("retail-other", None).get(d) is None
