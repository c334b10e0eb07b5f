"""LoRA algebra the strategies rely on (pure numpy).

A LoRA layer adds ``s * B @ A`` to a frozen weight (``s = alpha / r``). Averaging A and B
separately is *not* the average of the products::

    mean_k(B_k) @ mean_k(A_k)  !=  mean_k(B_k @ A_k)      in general.

With A frozen and shared (FFA-LoRA, Sun et al., ICLR 2024) it is exact and linear::

    (sum_k w_k B_k) @ A  ==  sum_k w_k (B_k @ A),

so FedAvg of B alone is FedAvg of the layer updates, and it composes with secure
aggregation. Sites of lower ranks over the same frozen A (``truncate_rank``, ``pad_rank``) keep
it exact: see "heterogeneous ranks" below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedlora.errors import ModelError


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


# ---- heterogeneous ranks over a shared frozen A ---------------------------------------
#
# A cohort trains LoRA at rank R (``lora.rank``); a site of a smaller compute budget trains rank
# r <= R. With A frozen and shared (``frozen_a``) such a site uses the first r components of every
# layer: A_r = A[:r] (r x in) and B_r = B[:, :r] (out x r). Writing b_j for B's columns and a_j for
# A's rows, ``B @ A = sum_j b_j a_j^T``, so ``B_r @ A_r`` is the first r rank-one terms of the
# cohort's product. Zero-padding a site's B update back to R columns gives it the cohort's shape
# and, for any A whose first r rows are A_r,
#
#     pad_R(B_r) @ A  ==  B_r @ A[:r],
#
# so the weighted sum of padded updates times the shared A is the weighted sum of the sites' own
# products, exactly and linearly (it composes with secure aggregation; the padded vector has the
# same length whatever r is, so the coordinator never learns it)::
#
#     (sum_k w_k pad_R(B_k)) @ A  ==  sum_k w_k B_k @ A[:r_k].
#
# The scaling must be the cohort's, alpha / R, at every site (PEFT scales by lora_alpha / r: a
# rank-r site sets lora_alpha = alpha * r / R). With A trained too (``standard``), padding A is not
# exact: the average of separately averaged factors is not the average of the products.


def _lora_axis(key: str) -> int | None:
    """The rank axis of a LoRA array by its (PEFT) name: 0 for A (rank x in), 1 for B (out x rank),
    None for anything else (a task head), which has no rank."""
    if ".lora_A." in key:
        return 0
    if ".lora_B." in key:
        return 1
    return None


def truncate_rank(state: Mapping[str, np.ndarray], r: int) -> dict[str, np.ndarray]:
    """The first ``r`` components of every LoRA array: A (R x in) -> ``A[:r]`` (r x in), B
    (out x R) -> ``B[:, :r]`` (out x r); every other array unchanged; the same keys. An array
    already at rank ``r`` is returned as it is. ``ModelError`` if ``r < 1`` or ``r`` exceeds an
    array's rank (a site cannot use components the cohort does not have)."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ModelError(f"a LoRA rank must be an integer >= 1, got {r!r}")
    out: dict[str, np.ndarray] = {}
    for k, v in state.items():
        axis = _lora_axis(k)
        if axis is None:
            out[k] = v
            continue
        have = np.shape(v)[axis]
        if r > have:
            raise ModelError(f"cannot truncate {k} to rank {r}: it has rank {have} (a site's rank is at most the cohort's lora.rank)")
        out[k] = v if r == have else (np.asarray(v)[:r] if axis == 0 else np.asarray(v)[:, :r])
    return out


def pad_rank(update: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """Every LoRA array zero-padded to ``rank`` components: A (r x in) -> (rank x in) with zero rows
    r.., B (out x r) -> (out x rank) with zero columns r..; every other array unchanged; the same
    keys and dtypes. The inverse of ``truncate_rank`` on the first r components
    (``truncate_rank(pad_rank(u, R), r) == u``); the padded components of a site's update are zero,
    so they leave the cohort's components beyond r to the sites that train them. ``ModelError``
    if an array's rank exceeds ``rank``."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ModelError(f"a LoRA rank must be an integer >= 1, got {rank!r}")
    out: dict[str, np.ndarray] = {}
    for k, v in update.items():
        axis = _lora_axis(k)
        if axis is None:
            out[k] = v
            continue
        arr = np.asarray(v)
        have = arr.shape[axis]
        if have > rank:
            raise ModelError(f"cannot pad {k} to rank {rank}: it already has rank {have}")
        if have == rank:
            out[k] = arr
            continue
        widths = [(0, 0)] * arr.ndim
        widths[axis] = (0, rank - have)
        out[k] = np.pad(arr, widths)
    return out
