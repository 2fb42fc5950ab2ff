"""Replica up-time in the billing database: each run of a replica's engine, from its start to its stop.

The node hands the recorder its replicas and the supervisor's state-change event; the recorder writes a row
when a replica starts, becomes ready and stops, and renews `seen_at` of the running ones every heartbeat,
so a worker that dies without stopping its replicas still counts their GPUs up to its last heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from worker.billing.store import LedgerStore
from worker.billing.store.records import ReplicaUptime
from worker.config import EngineKind
from worker.engines.replica import Replica, ReplicaState

logger = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
# An engine holds its GPUs from the moment it starts loading until it is stopped.
_RUNNING = frozenset({ReplicaState.starting, ReplicaState.ready})


def provisioned_gpus(replica: Replica) -> int:
    """GPUs a replica's run holds: its `gpus_per_replica` (simulated ones on the mock), none on an external engine."""
    model = replica.spec.model
    return 0 if model.engine is EngineKind.external else model.gpus_per_replica


class UptimeRecorder:
    def __init__(
        self, store: LedgerStore, worker_id: str, replicas: Sequence[Replica],
        state_changed: Callable[[], asyncio.Event], *, heartbeat_s: float = HEARTBEAT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._worker_id = worker_id
        self._replicas = [r for r in replicas if provisioned_gpus(r) > 0]
        self._state_changed = state_changed
        self._heartbeat_s = heartbeat_s
        self._clock = clock
        self._open: dict[str, tuple[ReplicaUptime, int]] = {}  # replica id -> its run, and its restart count
        self._unsaved: dict[tuple[str, float], ReplicaUptime] = {}  # kept until a save succeeds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        """Close every run still open (the replicas are stopped by now) and save them."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        now = self._clock()
        for run, _ in self._open.values():
            self._keep(run._replace(stopped_at=now, seen_at=now))
        self._open.clear()
        await self.save()

    async def _watch(self) -> None:
        while True:
            changed = self._state_changed()  # before looking, so that a change while saving wakes us at once
            self.observe()
            await self.save()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self._heartbeat_s)

    def observe(self) -> None:
        """Bring the runs up to the replicas' states, and renew `seen_at` of every running one."""
        now = self._clock()
        for replica in self._replicas:
            held = self._open.get(replica.replica_id)
            running = replica.state in _RUNNING
            if held is not None and (not running or held[1] != replica.restarts):
                del self._open[replica.replica_id]
                self._keep(held[0]._replace(stopped_at=now, seen_at=now))
                held = None
            if not running:
                continue
            ready_at = now if replica.state is ReplicaState.ready else None
            if held is None:
                run = ReplicaUptime(self._worker_id, replica.replica_id, now, replica.model_id,
                                    provisioned_gpus(replica), ready_at, None, now)
            else:
                run = held[0]._replace(ready_at=held[0].ready_at or ready_at, seen_at=now)
            self._open[replica.replica_id] = (run, replica.restarts)
            self._keep(run)

    def _keep(self, run: ReplicaUptime) -> None:
        self._unsaved[(run.replica_id, run.started_at)] = run

    async def refresh(self) -> None:
        """Record the replicas as they are now, so that a report up to now counts the running ones to now."""
        self.observe()
        await self.save()

    async def save(self) -> None:
        if not self._unsaved:
            return
        runs, self._unsaved = self._unsaved, {}
        saved = False
        try:
            await self._store.save_replica_uptime(list(runs.values()))
            saved = True
        except Exception as error:  # noqa: BLE001  up-time is retried at the next heartbeat; serving goes on
            logger.warning("could not record replica up-time", extra={"runs": len(runs), "error": repr(error)})
        finally:
            if not saved:  # failed, or cancelled by stop(): kept for the next save (saving again is harmless)
                self._unsaved = {**runs, **self._unsaved}
