"""Pick the replica that serves a request: the lowest load score, equal scores taking turns."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class ReplicaRouter:
    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, scored: Sequence[tuple[float, T]]) -> T | None:
        """The item with the lowest score; among equal scores, the starting point rotates per call."""
        if not scored:
            return None
        offset = next(self._turn) % len(scored)
        best_score, best = scored[offset]
        for index in range(1, len(scored)):
            score, item = scored[(offset + index) % len(scored)]
            if score < best_score:
                best_score, best = score, item
        return best
