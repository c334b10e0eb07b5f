"""What a site feeds into secure aggregation, and how the coordinator reads the sum (pure numpy).

**Train.** FedAvg needs ``sum_k n_k delta_k / sum_k n_k``; under secure aggregation the weights
must not travel in the clear, so each site applies its weight before masking: it sends the
floats ``w delta, w, w min(loss, L) / L`` with ``w = min(n, cap) / cap`` (``site_weight``: the
strategies' weight under the public ``federation.weight_cap``, as in the clear) in [0, 1], and the
public loss cap ``L = LOSS_SCALE`` keeps the loss term in [0, 1] (so the quantiser's clip range
holds for both), and the integers ``(values clipped, 1,
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

from fedlora.errors import FedloraError

from fedlora.strategies.base import site_weight  # the one definition of a site's weight (the same in the clear)

from .quantization import Quantizer

INT_FIELDS = 3  # values clipped, sites, unclipped updates (client-level DP)
LOSS_SCALE = 64.0  # train losses are capped at L and sent as loss / L
EVAL_LOSS_SCALE = 1_000_000  # eval loss sums travel as fixed-point integers in millionths
EVAL_MODULUS_BITS = 64


class ForgedSum(FedloraError, ValueError):
    """An unmasked sum breaks a bound that every sum of honest survivors keeps: some site sent
    a forged vector. The message names the check and the values; nothing of the sum is used."""


def train_length(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Entries of a site's train vector: the update's values, ``w``, the loss term, ``INT_FIELDS``."""
    return sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values()) + 2 + INT_FIELDS


def eval_length(buckets: int) -> int:
    """Entries of a site's eval vector: loss, correct, examples and ``buckets`` counts."""
    return 3 + buckets


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


def check_sum(total: np.ndarray, survivors: int, q: Quantizer) -> None:
    """Refuse (``ForgedSum``, naming the check and the values) an unmasked train sum that
    ``survivors`` honest sites cannot produce. With ``n = survivors``, ``e = q.error_bound(n)``,
    ``F`` float entries and ``W``, ``S`` the sums of ``w`` and ``w min(loss, L) / L``:

    * sites counted ``== n`` (each site adds exactly 1);
    * ``-e <= W <= n + e`` and ``W > 0`` (each ``w`` in ``[0, 1]``);
    * ``-e <= S <= W + 2 e`` (each loss term in ``[0, w]``): a mean train loss in ``[0, L]``;
    * values clipped ``<= n min(2^b - 1, F)``, unclipped updates ``<= n``;
    * every quantised float entry ``<= n (2^b - 1)`` (each in ``[0, 2^b - 1]``)."""
    total = np.asarray(total)
    if total.ndim != 1 or len(total) < INT_FIELDS + 2:
        raise ForgedSum(f"the unmasked sum has shape {total.shape}, not a vector of at least {INT_FIELDS + 2} entries")
    n, top = int(survivors), 2**q.bits - 1
    clipped, sites, unclipped = (int(x) for x in total[-INT_FIELDS:])
    if sites != n:
        raise ForgedSum(f"check 'sites counted': the unmasked sum counts {sites} site(s) but {n} survived (a forged contribution)")
    floats = q.dequantize_sum(total[:-INT_FIELDS][-2:], n)
    weight, loss_term, e = float(floats[0]), float(floats[1]), q.error_bound(n)
    if not (weight > 0 and -e <= weight <= n + e):
        raise ForgedSum(f"check 'total weight': the sum of the weights w is {weight:.6g}, outside (0, {n}] (+- {e:.2g}) for "
                        f"{n} site(s) with w in [0, 1] each (a forged weight)")
    if not -e <= loss_term <= weight + 2 * e:
        raise ForgedSum(f"check 'mean train loss': the loss terms sum to {loss_term:.6g} for a total weight {weight:.6g}, a mean "
                        f"loss of {loss_term / weight * LOSS_SCALE:.6g} outside [0, {LOSS_SCALE:g}] (a forged loss)")
    values = len(total) - INT_FIELDS
    if not 0 <= clipped <= n * min(top, values):
        raise ForgedSum(f"check 'values clipped': the sum counts {clipped} clipped values, more than {n} site(s) x "
                        f"{min(top, values)} (a forged count)")
    if not 0 <= unclipped <= n:
        raise ForgedSum(f"check 'unclipped updates': the sum counts {unclipped} unclipped updates for {n} site(s) (a forged clip bit)")
    over = np.flatnonzero(total[:-INT_FIELDS] > n * top)
    if over.size:
        i = int(over[0])
        raise ForgedSum(f"check 'value range': {over.size} quantised entries exceed {n} site(s) x {top} (entry {i} sums to "
                        f"{int(total[i])}): a forged value outside the clip range")


def read_sum(total: np.ndarray, shapes: Mapping[str, tuple[int, ...]], q: Quantizer, survivors: int | None = None) -> AggregateSum:
    """Divide the unmasked sums: weighted mean update, mean loss (in ``[0, L]``), clipped
    values, sites. With ``survivors`` the sum is first checked (``check_sum``) and must have
    the layout of ``shapes`` (``ForgedSum`` otherwise)."""
    if survivors is not None:
        if len(total) != train_length(shapes):
            raise ForgedSum(f"the unmasked sum has {len(total)} entries, the adapter's layout {train_length(shapes)}")
        check_sum(total, survivors, q)
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
    mean_loss = float(floats[-1] / weight * LOSS_SCALE)
    if survivors is not None:  # checked: within the quantiser's error of [0, L]
        mean_loss = min(max(mean_loss, 0.0), LOSS_SCALE)
    return AggregateSum(out, mean_loss, weight, int(ints[0]), sites, int(ints[2]))


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


def check_eval_sum(total: np.ndarray, noised: bool) -> None:
    """Refuse (``ForgedSum``, naming the check and the values) an unmasked eval sum no honest
    survivors can produce. Every honest vector, exact (``eval_vector``) or noised
    (``eval_release.integer_vector``: ``n`` is the sum of its rounded noised counts), has counts
    that sum to ``n`` exactly, so their sum does too (modulo 2^64). Without DP noise also
    ``n >= 0``, ``0 <= correct <= n``, loss sum ``>= 0`` and every count ``>= 0``; with noise
    these may fail honestly and are not checked."""
    t = [int(x) for x in np.asarray(total, dtype=np.uint64).view(np.int64)]
    if len(t) < 4:
        raise ForgedSum(f"the unmasked eval sum has {len(t)} entries, fewer than loss, correct, examples and one count")
    loss, correct, n, counts = t[0], t[1], t[2], t[3:]
    if (sum(counts) - n) % 2**64:
        raise ForgedSum(f"check 'counts sum to examples': the label counts sum to {sum(counts)} but the examples are {n} "
                        "(a forged count)")
    if noised:
        return
    if n < 0 or not 0 <= correct <= n:
        raise ForgedSum(f"check 'correct <= examples': {correct} correct of {n} examples (a forged count)")
    if loss < 0 or min(counts) < 0:
        raise ForgedSum(f"check 'non-negative sums': loss sum {loss}, smallest label count {min(counts)} (a forged value)")


def read_eval_sum(total: np.ndarray, sites: int, noised: bool | None = None) -> EvalSum:
    """The cohort's example-weighted eval loss and accuracy, examples and label counts; with
    ``noised`` given (whether any survivor's vector carries DP noise) the sum is first checked
    (``check_eval_sum``)."""
    if noised is not None:
        check_eval_sum(total, noised)
    t = np.asarray(total, dtype=np.uint64).view(np.int64)  # noised entries may be negative (two's complement)
    n = int(t[2])
    counts = np.maximum(t[3:].astype(np.int64), 0)
    if n <= 0:
        return EvalSum(None, None, 0, counts, sites)
    return EvalSum(max(0, int(t[0])) / EVAL_LOSS_SCALE / n, min(max(int(t[1]) / n, 0.0), 1.0), n, counts, sites)
