"""The node's admission as the gateway's Leaser: a lease at once when a replica has room, else a place in
the model's queue that the client's leaving gives up."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol, cast

from starlette.types import Receive

from worker.capacity.gpu_time import GpuTimeMeters, GpuTimeShare
from worker.gateway.context import RequestContext
from worker.gateway.leasing import EngineTarget
from worker.gateway.relay import Outcome, race
from worker.refusals import ClientDisconnected

if TYPE_CHECKING:
    from worker.engines.replica import Replica, ReplicaLease


class ReplicaAdmission(Protocol):
    def admit_now(self, ctx: RequestContext, exclude: Replica | None = None) -> ReplicaLease | None:
        """Lease a replica with room for `ctx` now; None when it should queue (never with `exclude`);
        raises the Refusal that declines it (worker/refusals.py)."""
        ...

    async def wait_for_slot(self, ctx: RequestContext, size_bytes: int = 0) -> ReplicaLease:
        """Queue `ctx` until a replica has room; raises the Refusal that declines it."""
        ...


class MeteredLease:
    """A replica's lease whose request is metered for GPU time from now until it is released (or its
    finalize settles it, whichever comes first)."""

    __slots__ = ("_lease", "_share")

    def __init__(self, lease: ReplicaLease, share: GpuTimeShare) -> None:
        self._lease = lease
        self._share = share

    @property
    def replica(self) -> Replica:
        return self._lease.replica

    @property
    def interrupted(self) -> asyncio.Event:
        return self._lease.interrupted

    @property
    def interruption_reason(self) -> str:
        return self._lease.interruption_reason

    def release(self) -> None:
        self._share.settle(time.monotonic())
        self._lease.release()


class AdmissionLeaser:
    def __init__(self, admission: ReplicaAdmission, gpu_time: GpuTimeMeters | None = None) -> None:
        self.admission = admission
        # Each replica's busy time and its requests' shares of it.
        self.gpu_time = gpu_time if gpu_time is not None else GpuTimeMeters()

    async def lease(self, ctx: RequestContext, *, exclude: EngineTarget | None = None,
                    receive: Receive | None = None) -> MeteredLease:
        # Only ever asked to exclude a replica it leased itself.
        lease = self.admission.admit_now(ctx, cast("Replica | None", exclude))
        if lease is None:
            lease = await self._queued(ctx, receive)
        return MeteredLease(lease, self.gpu_time.started(ctx, lease.replica.replica_id, time.monotonic()))

    async def _queued(self, ctx: RequestContext, receive: Receive | None) -> ReplicaLease:
        waiting = asyncio.ensure_future(self.admission.wait_for_slot(ctx, ctx.body_bytes))
        if receive is None:
            return await waiting
        if await race(waiting, receive=receive) is Outcome.disconnected:
            raise ClientDisconnected("the client left while its request was queued")
        return waiting.result()
