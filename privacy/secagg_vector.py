"""What a site feeds into secure aggregation, and how the coordinator reads the sum (pure numpy).

**Train.** FedAvg needs ``sum_k n_k delta_k / sum_k n_k``; under secure aggregation the weights
must not travel in the clear, so each site applies its weight before masking: it sends the
floats ``w delta, w, w min(loss, L) / L`` with ``w = min(1, n / weight_scale)`` (a public scale
keeps ``w`` in [0, 1] and the public loss cap ``L = LOSS_SCALE`` keeps the loss term in [0, 1],
so the quantiser's clip range holds for both), and the integers ``(values clipped, 1,
unclipped)`` where ``unclipped`` is client-level DP's bit ``1[||u|| <= C]`` (0 without it).
The coordinator unmasks the sums and divides: the weighted mean update and mean train loss,
the number of clipped values, the number of sites in the sum and the number of unclipped
updates. Arrays are laid out in sorted key order.

**Evaluate.** Each site sends only integers, summed exactly modulo ``2^64``:
``(round(loss * n * EVAL_LOSS_SCALE), correct, n, count of label 0, ..., count of label K-1)``;
the coordinator reads the example-weighted mean loss (within ``sites / (2 EVAL_LOSS_SCALE n)``),
the accuracy, the number of examples and the label counts (for the majority baseline) of the
whole cohort, and nothing per site.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .quantization import Quantizer

INT_FIELDS = 3  # values clipped, sites, unclipped updates (client-level DP)
LOSS_SCALE = 64.0  # train losses are capped at L and sent as loss / L
EVAL_LOSS_SCALE = 1_000_000  # eval loss sums travel as fixed-point integers in millionths
EVAL_MODULUS_BITS = 64


def site_weight(examples: int, weight_scale: float) -> float:
    return min(1.0, examples / weight_scale)


def float_part(delta: Mapping[str, np.ndarray], weight: float, loss: float) -> np.ndarray:
    """``w delta`` (sorted keys, flattened), ``w``, ``w min(loss, L) / L`` as one float64 vector."""
    sizes = [int(np.size(delta[k])) for k in sorted(delta)]
    out = np.empty(sum(sizes) + 2, dtype=np.float64)
    pos = 0
    for k, size in zip(sorted(delta), sizes):
        np.multiply(np.ravel(delta[k]), weight, out=out[pos:pos + size])
        pos += size
    out[pos:] = (weight, weight * min(max(loss, 0.0), LOSS_SCALE) / LOSS_SCALE)
    return out


def site_vector(delta: Mapping[str, np.ndarray], weight: float, loss: float, q: Quantizer,
                unclipped: int = 0) -> tuple[np.ndarray, int]:
    """The integers a site masks (the quantiser's wire dtype, modulo 2^m) and how many of its
    values were clipped. The count travels capped at ``2^bits - 1`` (like any value, so that
    the cohort's sum cannot wrap); the site's own return value is exact."""
    quantised, clipped = q.quantize_inplace(float_part(delta, weight, loss))
    tail = np.array([min(clipped, 2**q.bits - 1), 1, int(bool(unclipped))], dtype=quantised.dtype)
    return np.concatenate([quantised, tail]), clipped


@dataclass(frozen=True)
class AggregateSum:
    mean_delta: dict[str, np.ndarray]  # float32
    mean_loss: float
    weight: float
    clipped: int
    sites: int
    unclipped: int  # client-level DP: how many updates were within the clip norm


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
    return AggregateSum(out, float(floats[-1] / weight * LOSS_SCALE), weight, int(ints[0]), sites, int(ints[2]))


def eval_vector(loss: float, correct: int, examples: int, label_counts: Sequence[int]) -> np.ndarray:
    """A site's evaluation metrics as the integers it masks modulo 2^64."""
    if not (np.isfinite(loss) and loss >= 0):
        raise ValueError(f"eval loss must be finite and >= 0, got {loss}")
    head = [int(round(loss * examples * EVAL_LOSS_SCALE)), int(correct), int(examples)]
    return np.array(head + [int(c) for c in label_counts], dtype=np.uint64)


@dataclass(frozen=True)
class EvalSum:
    eval_loss: float | None
    accuracy: float | None
    examples: int
    label_counts: np.ndarray  # int64, per label, over the cohort
    sites: int


def read_eval_sum(total: np.ndarray, sites: int) -> EvalSum:
    """The cohort's example-weighted eval loss and accuracy, examples and label counts."""
    t = np.asarray(total, dtype=np.uint64).view(np.int64)  # noised entries may be negative (two's complement)
    n = int(t[2])
    counts = np.maximum(t[3:].astype(np.int64), 0)
    if n <= 0:
        return EvalSum(None, None, 0, counts, sites)
    return EvalSum(max(0, int(t[0])) / EVAL_LOSS_SCALE / n, min(max(int(t[1]) / n, 0.0), 1.0), n, counts, sites)
