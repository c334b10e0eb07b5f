"""Where a site's DP randomness comes from (pure Python, no torch).

Everything a DP guarantee rests on (DP-SGD's Gaussian noise, Poisson batch sampling, client-level
noise shares, the eval-metric noise) is drawn from generators seeded with 128 bits of the
operating system's cryptographically secure randomness (``os.urandom``), fresh for every round
and every attempt: nothing the coordinator knows (the run's seed, the round, the site's name)
determines it, and a round trained again draws new batches and new noise.

``RoundSeeds.reproducible`` is the research switch (``privacy.reproducible_noise``, simulation
only): the seeds are derived from the run's seed, the site, the round and the attempt, so a run
can be replayed bit for bit, and it then gives **no** guarantee against anyone who knows the seed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass


def secret_seed() -> int:
    """128 bits from the OS's CSPRNG, as a non-negative integer (a seed for numpy and torch)."""
    return int.from_bytes(os.urandom(16), "little")


def _derived(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class RoundSeeds:
    """Seeds for one DP round at one site: ``noise`` (Gaussian noise of DP-SGD), ``sampling``
    (Poisson batches), ``dropout`` (LoRA dropout), ``share`` (client-level noise share) and
    ``eval`` (noise on released eval metrics). ``secret`` says whether they came from the OS."""

    noise: int
    sampling: int
    dropout: int
    share: int
    eval: int
    secret: bool

    @classmethod
    def fresh(cls) -> RoundSeeds:
        """Secret seeds: 5 x 128 bits of ``os.urandom``."""
        return cls(secret_seed(), secret_seed(), secret_seed(), secret_seed(), secret_seed(), True)

    @classmethod
    def reproducible(cls, seed: int, site: str, round_: int, attempt: int = 0) -> RoundSeeds:
        """Seeds derived from what the coordinator knows (research only: no guarantee against it)."""
        parts = (seed, site, round_, attempt)
        return cls(_derived("dp-noise", *parts), _derived("poisson", *parts), _derived("dropout", *parts),
                   _derived("client-noise", *parts), _derived("eval-noise", *parts), False)

    def torch_seed(self, which: str) -> int:
        """A seed torch accepts (< 2^64) for ``noise`` or ``dropout``."""
        return int(getattr(self, which)) % (2**64)
