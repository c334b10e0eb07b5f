"""LoRA algebra the strategies rely on (pure numpy).

A LoRA layer adds ``s * B @ A`` to a frozen weight (``s = alpha / r``). Averaging A and B
separately is *not* the average of the products::

    mean_k(B_k) @ mean_k(A_k)  !=  mean_k(B_k @ A_k)      in general.

With A frozen and shared (FFA-LoRA, Sun et al., ICLR 2024) it is exact and linear::

    (sum_k w_k B_k) @ A  ==  sum_k w_k (B_k @ A),

so FedAvg of B alone is FedAvg of the layer updates, and it composes with secure
aggregation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def lora_delta(b: np.ndarray, a: np.ndarray, scale: float) -> np.ndarray:
    """The dense weight change ``scale * B @ A`` of one LoRA layer."""
    return scale * (np.asarray(b, dtype=np.float64) @ np.asarray(a, dtype=np.float64))


def mean_of_products(bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], weights: Sequence[float], scale: float) -> np.ndarray:
    """``sum_k w_k s B_k A_k / sum_k w_k``: the average of the sites' dense updates."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    return sum(wk * lora_delta(b, a, scale) for wk, b, a in zip(w, bs, as_, strict=True))


def product_of_means(bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], weights: Sequence[float], scale: float) -> np.ndarray:
    """``s (mean_k B_k)(mean_k A_k)``: what averaging A and B separately yields."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    b = sum(wk * np.asarray(x, dtype=np.float64) for wk, x in zip(w, bs, strict=True))
    a = sum(wk * np.asarray(x, dtype=np.float64) for wk, x in zip(w, as_, strict=True))
    return lora_delta(b, a, scale)
