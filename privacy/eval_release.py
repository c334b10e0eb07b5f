"""A site's evaluation metrics as a DP release (pure numpy): the noised metric vector.

Per site and evaluation the metrics are the vector

    v = ( sum_i min(loss_i, L) / L,  correct,  count_0, ..., count_{K-1} )

over its eval records (per-example cross-entropy capped at ``L = LOSS_CAP``). Adding or removing
one record changes the first entry by at most 1, ``correct`` by at most 1 and one count by 1, so
the L2 sensitivity is at most sqrt(3). The noised release ``v + N(0, (sigma sqrt 3)^2 I)`` is a
Gaussian mechanism of multiplier ``sigma``: one ``EvalNoiseEvent`` in the site's ledger, composed
with its DP-SGD events. Everything the coordinator reads from it (examples = sum of counts, mean
loss, accuracy, the majority baseline) is post-processing; values are clamped to their ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOSS_CAP = 8.0  # per-example eval loss cap (nats): the loss entry's sensitivity is 1 after dividing by it
SENSITIVITY = math.sqrt(3.0)


def metric_vector(loss_sum_capped: float, correct: int, label_counts: list[int]) -> np.ndarray:
    """``v`` above in float64 (``loss_sum_capped`` = sum of min(loss_i, LOSS_CAP))."""
    return np.array([loss_sum_capped / LOSS_CAP, float(correct), *map(float, label_counts)], dtype=np.float64)


def noised(v: np.ndarray, noise_multiplier: float, rng: np.random.Generator) -> np.ndarray:
    """``v + N(0, (noise_multiplier * sqrt 3)^2)`` per entry."""
    if not noise_multiplier > 0:
        raise ValueError(f"the eval noise multiplier must be > 0, got {noise_multiplier}")
    if not np.all(np.isfinite(v)):
        raise ValueError("the eval metric vector holds a non-finite value; refusing to release it")
    return np.asarray(v, dtype=np.float64) + rng.normal(0.0, noise_multiplier * SENSITIVITY, size=np.shape(v))


@dataclass(frozen=True)
class ReadMetrics:
    eval_loss: float
    accuracy: float
    num_examples: int
    label_counts: list[int]


def read(v: np.ndarray) -> ReadMetrics:
    """Post-processing of a (noised) metric vector, clamped to valid ranges."""
    counts = [max(0, int(round(c))) for c in v[2:]]
    n = max(1, sum(counts))
    return ReadMetrics(eval_loss=float(min(max(v[0], 0.0) * LOSS_CAP / n, LOSS_CAP)), accuracy=float(min(max(v[1] / n, 0.0), 1.0)),
                       num_examples=n, label_counts=counts)


def integer_vector(v: np.ndarray, loss_scale: int) -> np.ndarray:
    """A noised vector in the layout of ``secagg_vector.eval_vector`` (loss * n * scale, correct, n,
    counts), rounded to integers and wrapped into uint64 (two's complement: sums of negative
    noise stay right modulo 2^64)."""
    counts = np.round(v[2:]).astype(np.int64)
    head = [int(round(v[0] * LOSS_CAP * loss_scale)), int(round(v[1])), int(counts.sum())]
    return np.array(head + counts.tolist(), dtype=np.int64).view(np.uint64)
