"""Fixed-point quantisation of updates for secure aggregation (pure numpy).

Secure aggregation adds integers modulo ``2^m``; updates are floats. Each site maps every value
``x`` to ``q(x) = round((clip(x, -r, r) + r) / s)`` with step ``s = 2 r / (2^b - 1)``, an
integer in ``[0, 2^b - 1]`` (b bits per value; round half to even). The coordinator unmasks
the sum ``Q = sum_i q(x_i)`` over the n sites and recovers ``sum_i x_i ~ Q s - n r``.

Error bound (deterministic rounding): for values inside the clip range each site's value is
off by at most ``s / 2``, so the recovered sum of n sites is within ``n s / 2`` of the true
sum per coordinate. Values beyond the clip range are clipped and *counted*, never wrapped.

No overflow: the sum never wraps when ``n (2^b - 1) < 2^m`` (``check_no_overflow``), which a
run must ensure for its largest cohort before it starts. Vectors travel in the smallest
unsigned type that holds m bits (``wire_dtype``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def wire_dtype(modulus_bits: int) -> np.dtype:
    """The smallest unsigned integer type that holds ``modulus_bits`` bits."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if modulus_bits <= np.dtype(dt).itemsize * 8:
            return np.dtype(dt)
    raise ValueError(f"no unsigned type holds {modulus_bits} bits")


@dataclass(frozen=True)
class Quantizer:
    clip_range: float  # r: values are clipped to [-r, r]
    bits: int  # b: levels per value 2^b
    modulus_bits: int  # m: arithmetic modulo 2^m

    def __post_init__(self) -> None:
        if not self.clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {self.clip_range}")
        if not 1 <= self.bits <= 62:
            raise ValueError(f"bits must be in [1, 62], got {self.bits}")
        if not self.bits <= self.modulus_bits <= 64:
            raise ValueError(f"modulus_bits must be in [bits, 64] = [{self.bits}, 64], got {self.modulus_bits}")

    @property
    def step(self) -> float:
        return 2 * self.clip_range / (2**self.bits - 1)

    @property
    def wire_dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds ``modulus_bits`` bits."""
        return wire_dtype(self.modulus_bits)

    def max_sites(self) -> int:
        """The most sites whose quantised values can be summed without wrapping modulo 2^m."""
        return (2**self.modulus_bits - 1) // (2**self.bits - 1)

    def check_no_overflow(self, sites: int) -> None:
        if sites > self.max_sites():
            raise ValueError(f"{sites} sites x (2^{self.bits} - 1) overflows the modulus 2^{self.modulus_bits}: at most "
                             f"{self.max_sites()} sites; use fewer quantisation bits or a larger modulus")

    def error_bound(self, sites: int) -> float:
        """Largest per-coordinate error of a recovered sum of ``sites`` in-range values."""
        return sites * self.step / 2

    def quantize(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        """(integers in [0, 2^b - 1] as the wire dtype, how many values were clipped)."""
        x = np.array(values, dtype=np.float64)  # a copy, worked on in place
        return self.quantize_inplace(x)

    def quantize_inplace(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """``quantize`` on a float64 array it may overwrite (saves the copies on large updates)."""
        if not np.all(np.isfinite(x)):
            raise ValueError("cannot quantise NaN or Inf")
        r = self.clip_range
        clipped = int(np.count_nonzero(x > r)) + int(np.count_nonzero(x < -r))
        np.clip(x, -r, r, out=x)
        x += r
        x /= self.step
        np.rint(x, out=x)
        return x.astype(self.wire_dtype), clipped

    def dequantize_sum(self, total: np.ndarray, sites: int) -> np.ndarray:
        """The float sum of ``sites`` values from the unmasked sum of their quantised values."""
        return np.asarray(total, dtype=np.float64) * self.step - sites * self.clip_range
