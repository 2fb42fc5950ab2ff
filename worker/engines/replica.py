"""Live state of one engine replica as the gateway and supervisor see it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from enum import Enum

import httpx

from worker.engines.base import Engine, EngineExited, PortInUse
from worker.engines.data_client import EngineDataClient
from worker.engines.loading import LoadProgress


class ReplicaState(str, Enum):
    starting = "starting"
    ready = "ready"
    unhealthy = "unhealthy"
    restarting = "restarting"
    port_in_use = "port_in_use"  # another process listens on the replica's port: retried with backoff
    stopped = "stopped"


def make_engine_client(base_url: str) -> httpx.AsyncClient:
    # One pooled keep-alive client per replica; no read timeout, since streams legitimately run long.
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=512, keepalive_expiry=30.0),
    )


class _Interruption:
    """Shared by the requests leased in one period; set when they must end now (restart, shutdown)."""

    __slots__ = ("event", "reason")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason = ""


class ReplicaLease:
    """One request the gateway admitted to a replica: counted in its `in_flight` until released."""

    __slots__ = ("_interruption", "_released", "replica", "started")

    def __init__(self, replica: Replica, interruption: _Interruption) -> None:
        self.replica = replica
        self._interruption = interruption
        self._released = False
        self.started = time.monotonic()

    @property
    def interrupted(self) -> asyncio.Event:
        """Set when the request must end now; `interruption_reason` says why."""
        return self._interruption.event

    @property
    def interruption_reason(self) -> str:
        return self._interruption.reason

    def release(self) -> None:
        if not self._released:
            self._released = True
            replica = self.replica
            replica.in_flight -= 1
            if replica.on_free is not None:
                replica.on_free(time.monotonic() - self.started)


class Replica:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.spec = engine.spec
        self.replica_id = engine.spec.replica_id
        self.model_id = engine.spec.model.id
        self.state = ReplicaState.starting
        self.state_since = time.monotonic()
        self.in_flight = 0
        # Called with how long the slot was held when a lease ends: a queued request may take it.
        self.on_free: Callable[[float], None] | None = None
        self.restarts = 0
        self.last_exit: EngineExited | None = None
        # Set when the replica's hardware failed: it stays out of service until the worker restarts.
        self.quarantine_reason: str | None = None
        # While the state is port_in_use: who listens on the replica's port (pid None: not visible to us).
        self.port_holder: PortInUse | None = None
        # Control calls (health, stats, version) on `client`; inference traffic on `data`.
        self.client = make_engine_client(engine.base_url)
        self.data = EngineDataClient(engine.base_url)
        self._interruption = _Interruption()

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.data.aclose()

    def lease(self) -> ReplicaLease:
        """Count one more request in flight; the caller must `release()` the lease when it ends."""
        self.in_flight += 1
        return ReplicaLease(self, self._interruption)

    def interrupt_requests(self, reason: str) -> None:
        """End every request leased so far (streams close with an error chunk); later leases are unaffected."""
        interruption, self._interruption = self._interruption, _Interruption()
        interruption.reason = reason
        interruption.event.set()

    def set_state(self, state: ReplicaState) -> None:
        if state is not self.state:
            self.state = state
            self.state_since = time.monotonic()

    @property
    def routable(self) -> bool:
        return self.state is ReplicaState.ready

    @property
    def load_progress(self) -> LoadProgress | None:
        """How far the engine has got loading its model, while it is starting and reports it."""
        return self.engine.load_progress if self.state is ReplicaState.starting else None

    def describe(self) -> dict[str, object]:
        return {
            "replica": self.replica_id,
            "model": self.model_id,
            "state": self.state.value,
            "in_flight": self.in_flight,
            "restarts": self.restarts,
            "engine": self.engine.describe(),
            "last_exit_code": self.last_exit.returncode if self.last_exit else None,
            "quarantine_reason": self.quarantine_reason,
            "port_holder_pid": self.port_holder.holder_pid if self.port_holder else None,
        }
