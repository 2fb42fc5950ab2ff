"""Draining: stop taking new requests, let the admitted ones finish, end what is left cleanly."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from worker.engines.replica import Replica

logger = logging.getLogger(__name__)

POLL_S = 0.05
# After the grace period: how long ended streams get to write their closing chunks.
CLOSE_WAIT_S = 5.0


class DrainState:
    """Whether the node refuses new work; a shutdown drain cannot be undone."""

    def __init__(self) -> None:
        self.draining = False
        self.shutting_down = False
        self.since: float | None = None

    def begin(self, *, shutting_down: bool = False) -> None:
        if not self.draining:
            self.since = time.monotonic()
        self.draining = True
        self.shutting_down = self.shutting_down or shutting_down

    def end(self) -> bool:
        """Take work again; False when the node is shutting down (then it stays drained)."""
        if self.shutting_down:
            return False
        self.draining = False
        self.since = None
        return True


def in_flight(replicas: Sequence[Replica]) -> int:
    return sum(replica.in_flight for replica in replicas)


async def _wait_idle(replicas: Sequence[Replica], timeout_s: float, hurry: asyncio.Event | None,
                     queued: Callable[[], int] = lambda: 0) -> bool:
    deadline = time.monotonic() + timeout_s
    while in_flight(replicas) > 0 or queued() > 0:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or (hurry is not None and hurry.is_set()):
            return False
        await asyncio.sleep(min(POLL_S, remaining))
    return True


async def finish_in_flight(replicas: Sequence[Replica], grace_s: float, hurry: asyncio.Event | None = None,
                           queued: Callable[[], int] = lambda: 0,
                           refuse_queued: Callable[[], int] = lambda: 0) -> int:
    """Wait up to `grace_s` (or until `hurry` is set) for in-flight and queued requests, then end the rest.

    Queued requests are still bound to replicas as slots free up meanwhile; those left at the end are
    refused (`refuse_queued`: 503 before any byte). Ended streams close with the router's error chunk and
    `[DONE]`. Returns how many were ended or refused.
    """
    if await _wait_idle(replicas, grace_s, hurry, queued):
        return 0
    refused = refuse_queued()
    left = in_flight(replicas)
    logger.warning("drain grace period over; ending in-flight requests",
                   extra={"in_flight": left, "queued_refused": refused})
    for replica in replicas:
        replica.interrupt_requests("the worker is shutting down")
    await _wait_idle(replicas, CLOSE_WAIT_S, None)
    return left + refused
