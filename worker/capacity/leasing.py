"""The node's admission as the gateway's Leaser: a lease at once when a replica has room, else a place in
the model's queue that the client's leaving gives up."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol, cast

from starlette.types import Receive

from worker.gateway.context import RequestContext
from worker.gateway.errors import ClientDisconnected
from worker.gateway.leasing import EngineTarget
from worker.gateway.relay import Outcome, race

if TYPE_CHECKING:
    from worker.engines.replica import Replica, ReplicaLease


class ReplicaAdmission(Protocol):
    def admit_now(self, ctx: RequestContext, exclude: Replica | None = None) -> ReplicaLease | None:
        """Lease a replica with room for `ctx` now; None when it should queue (never with `exclude`);
        raises the ApiError that refuses it (400/429/503)."""
        ...

    async def wait_for_slot(self, ctx: RequestContext, size_bytes: int = 0) -> ReplicaLease:
        """Queue `ctx` until a replica has room; raises the ApiError that refuses it (429/503)."""
        ...


class AdmissionLeaser:
    def __init__(self, admission: ReplicaAdmission) -> None:
        self.admission = admission

    async def lease(self, ctx: RequestContext, *, exclude: EngineTarget | None = None,
                    receive: Receive | None = None) -> ReplicaLease:
        # Only ever asked to exclude a replica it leased itself.
        lease = self.admission.admit_now(ctx, cast("Replica | None", exclude))
        if lease is not None:
            return lease
        waiting = asyncio.ensure_future(self.admission.wait_for_slot(ctx, ctx.body_bytes))
        if receive is None:
            return await waiting
        if await race(waiting, receive=receive) is Outcome.disconnected:
            raise ClientDisconnected("the client left while its request was queued")
        return waiting.result()
