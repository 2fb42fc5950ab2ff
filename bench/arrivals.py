"""Open-loop load: request arrival times of a Poisson process, the same for every path given the same seed."""

from __future__ import annotations

import random
from collections.abc import Iterator


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> Iterator[float]:
    """Seconds from the start at which requests arrive, `rate` per second on average, up to `duration_s`."""
    rng = random.Random(seed)
    at = rng.expovariate(rate)
    while at < duration_s:
        yield at
        at += rng.expovariate(rate)
