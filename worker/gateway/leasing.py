"""What the gateway needs of the replicas it sends requests to: a lease on one, however it is obtained.

In the worker process the node's admission (queue and scheduler) grants leases on its own replicas
(worker/capacity/leasing.py); in a relay process the worker process grants them over its channel
(worker/gateway/processes/relay_process.py). The gateway sees only these protocols
(and `EngineTarget`, the replica a lease is on, which lives with the request context that records it).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from starlette.types import Receive

from worker.gateway.context import EngineTarget, RequestContext

__all__ = ["EngineTarget", "Lease", "Leaser"]


class Lease(Protocol):
    """One request's slot on a replica, held until `release()` (idempotent)."""

    @property
    def replica(self) -> EngineTarget: ...

    @property
    def interrupted(self) -> asyncio.Event:
        """Set when the request must end now (its replica restarts, the worker drains)."""
        ...

    @property
    def interruption_reason(self) -> str: ...

    def release(self) -> None: ...


class Leaser(Protocol):
    async def lease(self, ctx: RequestContext, *, exclude: EngineTarget | None = None,
                    receive: Receive | None = None) -> Lease:
        """The lease of a replica that serves `ctx`, bound at once or after waiting in the model's queue;
        `exclude` is a replica that just failed it. Raises the ApiError that refuses the request, or
        ClientDisconnected when `receive` says the client left while it waited."""
        ...
