"""The worker's queue of one model's admitted requests, waiting for a batch slot on some replica.

Requests are bound to a replica only when one has room (late binding). Until then they wait here, served
by priority first and, within a priority, round-robin across flows (accounts): one account's backlog
adds at most one request per turn ahead of another account's first request. When a slot frees, the
worker may bind a request a few turns further on whose prompt prefix that replica holds (see
`Admission._dispatch`); the requests passed over keep their places.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.capacity.prefix_index import PromptKey
    from worker.engines.replica import ReplicaLease
    from worker.gateway.context import RequestContext


@dataclass(eq=False, slots=True)
class Waiter:
    """One queued request; `granted` gets its replica lease when it is bound."""

    ctx: RequestContext
    flow: str
    priority: int
    size_bytes: int
    enqueued_at: float
    deadline: float
    granted: asyncio.Future[ReplicaLease] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    # Computed when placement first looks at the request; None when the model has no prefix index.
    prompt_key: PromptKey | None = None
    keyed: bool = False
    # Times a request later in turn order was bound first (to a replica holding its prefix).
    passed_over: int = 0


class FairQueue:
    """Priority levels, each a round-robin over flows, each flow first-in first-out."""

    def __init__(self) -> None:
        # priority -> flow -> its waiters; a flow's place in the OrderedDict is its turn.
        self._levels: dict[int, OrderedDict[str, deque[Waiter]]] = {}
        self.depth = 0
        self.size_bytes = 0

    def push(self, waiter: Waiter) -> None:
        flows = self._levels.setdefault(waiter.priority, OrderedDict())
        flows.setdefault(waiter.flow, deque()).append(waiter)
        self.depth += 1
        self.size_bytes += waiter.size_bytes

    def peek(self) -> Waiter | None:
        """The request whose turn it is."""
        for priority in sorted(self._levels, reverse=True):
            flows = self._levels[priority]
            if flows:
                return next(iter(flows.values()))[0]
        return None

    def in_turn_order(self, limit: int) -> list[Waiter]:
        """Up to `limit` requests of the highest priority present, in the order `peek`/`pop` would take them."""
        if not self._levels:
            return []
        flows = list(self._levels[max(self._levels)].values())
        ordered: list[Waiter] = []
        for turn in range(max(len(waiters) for waiters in flows)):
            for waiters in flows:
                if turn < len(waiters):
                    ordered.append(waiters[turn])
                    if len(ordered) >= limit:
                        return ordered
        return ordered

    def pop(self, waiter: Waiter) -> None:
        """Take a request that is being bound (usually the head, from `peek`): its flow's turn passes to
        the next flow."""
        flows = self._levels[waiter.priority]
        waiters = flows[waiter.flow]
        if waiters[0] is waiter:
            waiters.popleft()
        else:
            waiters.remove(waiter)
        if waiters:
            flows.move_to_end(waiter.flow)
        else:
            del flows[waiter.flow]
        self._forget(waiter)

    def remove(self, waiter: Waiter) -> bool:
        """Take a request out wherever it is (its client left, or its deadline passed)."""
        flows = self._levels.get(waiter.priority)
        waiters = flows.get(waiter.flow) if flows is not None else None
        if waiters is None or waiter not in waiters:
            return False
        waiters.remove(waiter)
        if not waiters:
            del flows[waiter.flow]  # type: ignore[union-attr]
        self._forget(waiter)
        return True

    def _forget(self, waiter: Waiter) -> None:
        self.depth -= 1
        self.size_bytes -= waiter.size_bytes
        if not self._levels[waiter.priority]:
            del self._levels[waiter.priority]

    def ahead_of(self, flow: str, priority: int) -> int:
        """How many queued requests a new request of `flow` would wait behind: every request of a higher
        priority, and of its own priority one per turn of each other flow for each of its own before it."""
        ahead = 0
        for level, flows in self._levels.items():
            if level > priority:
                ahead += sum(len(waiters) for waiters in flows.values())
            elif level == priority:
                own = len(flows.get(flow, ()))
                ahead += own + sum(min(len(waiters), own + 1) for name, waiters in flows.items() if name != flow)
        return ahead

    def oldest_enqueued_at(self) -> float | None:
        heads = [waiters[0].enqueued_at for flows in self._levels.values() for waiters in flows.values()]
        return min(heads) if heads else None

    def waiters(self) -> list[Waiter]:
        return [w for flows in self._levels.values() for waiters in flows.values() for w in waiters]
