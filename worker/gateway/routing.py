"""Choose the replica that serves a request: the least-loaded routable replica of the model."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from worker.engines.replica import Replica


class ReplicaRouter:
    def __init__(self) -> None:
        self._tiebreak = itertools.count()

    def choose(self, replicas: Sequence[Replica], exclude: Replica | None = None) -> Replica | None:
        candidates = [r for r in replicas if r.routable and r is not exclude]
        if not candidates:
            return None
        # Rotate the starting point so equally loaded replicas share traffic.
        offset = next(self._tiebreak) % len(candidates)
        rotated = candidates[offset:] + candidates[:offset]
        return min(rotated, key=lambda r: r.in_flight)
