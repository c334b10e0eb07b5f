from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedlora.errors import WireError
from fedlora.records import from_record, to_record
from fedlora.wire import RELATIVE_ERROR, decode_array, encode_array, encode_state, payload_bytes


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"layer.lora_A.weight": rng.normal(size=(4, 32)).astype(np.float32),
            "layer.lora_B.weight": rng.normal(size=(32, 4)).astype(np.float32),
            "classifier.bias": rng.normal(size=(3,)).astype(np.float32)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_record_round_trip_and_byte_count(dtype: str) -> None:
    state = _state()
    record, nbytes = to_record(state, dtype)
    per_value = 4 if dtype == "float32" else 2
    n_values = sum(v.size for v in state.values())
    assert nbytes == n_values * per_value + sum(len(k) for k in state)
    assert sum(len(a.data) for a in record.values()) == n_values * per_value
    back, nbytes_back = from_record(record, {k: v.shape for k, v in state.items()})
    assert nbytes_back == nbytes
    for k, v in state.items():
        assert back[k].dtype == np.float32 and back[k].shape == v.shape
        if dtype == "float32":
            assert np.array_equal(back[k], v)
        else:
            np.testing.assert_allclose(back[k], v, rtol=RELATIVE_ERROR[dtype], atol=1e-7)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.integers(1, 64), elements=st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False,
                                                                  min_value=float(np.float32(-3e38)), max_value=float(np.float32(3e38)))))
def test_bfloat16_rounding_error_is_within_its_bound(x: np.ndarray) -> None:
    y = decode_array("x", encode_array("x", x, "bfloat16"))
    assert np.all(np.abs(y - x) <= np.abs(x) * RELATIVE_ERROR["bfloat16"])


def test_bfloat16_rounds_to_nearest_even() -> None:
    # 1 + 2^-8 lies exactly half-way between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1.0)
    x = np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8], dtype=np.float32)
    y = decode_array("x", encode_array("x", x, "bfloat16"))
    assert y.tolist() == [1.0, 1.0 + 2.0**-6]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    x = np.ones(5, dtype=np.float32)
    x[2] = bad
    with pytest.raises(WireError, match="non-finite"):
        encode_array("lora_B", x, "float32")


def test_overflow_is_refused_not_saturated() -> None:
    with pytest.raises(WireError, match="float16"):
        encode_array("x", np.array([1e6], dtype=np.float32), "float16")
    with pytest.raises(WireError, match="bfloat16"):
        encode_array("x", np.array([np.finfo(np.float32).max], dtype=np.float32), "bfloat16")


def test_wrong_shape_keys_or_length_are_refused() -> None:
    state = _state()
    record, _ = to_record(state, "float32")
    shapes = {k: v.shape for k, v in state.items()}
    with pytest.raises(WireError, match="shape"):
        from_record(record, {**shapes, "classifier.bias": (4,)})
    with pytest.raises(WireError, match="missing"):
        from_record(record, {**shapes, "extra.weight": (1,)})
    wire = encode_state(state, "float32")
    w = wire["classifier.bias"]
    from fedlora.wire import WireArray
    with pytest.raises(WireError, match="bytes"):
        decode_array("classifier.bias", WireArray(w.dtype, w.shape, w.data[:-4]))
    assert payload_bytes(wire) > 0


def test_content_bytes_counts_every_record_key_and_value() -> None:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedlora.records import content_bytes

    record, array_bytes = to_record({"w": np.zeros(3, np.float32)}, "float32")  # 12 data + 1 key
    content = RecordDict({"adapter": record, "config": ConfigRecord({"round": 2, "cohort": "médical", "labels": ["a", "bc"]}),
                          "m": MetricRecord({"loss": 0.5})})
    expected = (len("adapter") + array_bytes) + (len("config") + len("round") + 8 + len("cohort") + len("médical".encode())
                                                 + len("labels") + 3) + (len("m") + len("loss") + 8)
    assert content_bytes(content) == expected
