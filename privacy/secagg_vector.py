"""What a site feeds into secure aggregation, and how the coordinator reads the sum (pure numpy).

FedAvg needs ``sum_k n_k delta_k / sum_k n_k``; under secure aggregation the weights must not
travel in the clear, so each site applies its weight before masking: it sends the floats
``w delta, w, w loss`` with ``w = min(1, n / weight_scale)`` (a public scale keeps ``w`` in
[0, 1] so that the clip range of the quantiser holds), and the integers ``(values clipped, 1)``.
The coordinator unmasks the sums and divides: the weighted mean update and mean train loss,
the number of clipped values, and the number of sites in the sum. Arrays are laid out in
sorted key order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .quantization import Quantizer

INT_FIELDS = 2  # values clipped, sites


def site_weight(examples: int, weight_scale: float) -> float:
    return min(1.0, examples / weight_scale)


def float_part(delta: Mapping[str, np.ndarray], weight: float, loss: float) -> np.ndarray:
    flat = [np.asarray(delta[k], dtype=np.float64).ravel() * weight for k in sorted(delta)]
    return np.concatenate([*flat, np.array([weight, weight * loss])])


def site_vector(delta: Mapping[str, np.ndarray], weight: float, loss: float, q: Quantizer) -> tuple[np.ndarray, int]:
    """The integers a site masks (uint64, modulo 2^m) and how many of its values were clipped."""
    quantised, clipped = q.quantize(float_part(delta, weight, loss))
    return np.concatenate([quantised.astype(np.uint64), np.array([clipped, 1], dtype=np.uint64)]), clipped


@dataclass(frozen=True)
class AggregateSum:
    mean_delta: dict[str, np.ndarray]  # float32
    mean_loss: float
    weight: float
    clipped: int
    sites: int


def read_sum(total: np.ndarray, shapes: Mapping[str, tuple[int, ...]], q: Quantizer) -> AggregateSum:
    """Divide the unmasked sums: weighted mean update, mean loss, clipped values, sites."""
    ints = total[-INT_FIELDS:].astype(np.int64)
    sites = int(ints[1])
    floats = q.dequantize_sum(total[:-INT_FIELDS], sites)
    weight = float(floats[-2])
    if not weight > 0:
        raise ValueError(f"the secure sum carries no weight ({weight:.3g}); no site contributed")
    out, pos = {}, 0
    for k in sorted(shapes):
        size = int(np.prod(shapes[k], dtype=np.int64))
        out[k] = (floats[pos:pos + size] / weight).reshape(shapes[k]).astype(np.float32)
        pos += size
    return AggregateSum(out, float(floats[-1] / weight), weight, int(ints[0]), sites)
