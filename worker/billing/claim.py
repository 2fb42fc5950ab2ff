"""One worker per worker id in a shared billing database: the id is claimed at start, renewed while the
worker runs, released when it stops, and taken over from a worker that went silent."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import psutil
import uuid_utils

from worker.billing.store import LedgerStore
from worker.billing.store.records import WorkerClaim

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimTiming:
    """How a worker keeps its worker id to itself in a shared database (see `WorkerIdClaim.acquire`)."""

    renew_s: float = 10.0
    # A holder not heard from for this long has stopped (killed, or its node gone): its id is free.
    stale_s: float = 30.0
    retry_s: float = 1.0


class WorkerIdInUse(RuntimeError):
    """Another running worker holds this worker id in the same database."""


class WorkerIdClaim:
    """This worker's hold on its id. `lost` turns true once another worker took the id over: from then
    on that worker may release the balance held in the id's name, so this one must take no requests."""

    def __init__(self, store: LedgerStore, worker_id: str, timing: ClaimTiming,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.worker_id = worker_id
        self.timing = timing
        self.clock = clock
        # None once released (or never held): nothing to give back at close.
        self.instance_id: str | None = uuid_utils.uuid7().hex
        self.renewal: asyncio.Task[None] | None = None
        self.lost = False
        self._on_lost: Callable[[], Awaitable[None]] | None = None

    async def acquire(self) -> None:
        """Hold the id for this worker alone, waiting out the claim of one that stopped unannounced.

        Raises WorkerIdInUse when another worker keeps renewing it: two running workers with one id would
        release each other's balance holds at start-up and share one outbox cursor.
        """
        assert self.instance_id is not None
        timing, worker_id = self.timing, self.worker_id
        started = time.time()
        waited_for: str | None = None
        gone: str | None = None
        host, pid, process_started_at = socket.gethostname(), os.getpid(), psutil.Process().create_time()
        while True:
            now = time.time()
            holder = await self.store.claim_worker_id(
                WorkerClaim(worker_id=worker_id, instance_id=self.instance_id, host=host, pid=pid,
                            process_started_at=process_started_at, claimed_at=now, seen_at=now),
                stale_before=now - timing.stale_s,
                gone_instance=gone,
            )
            if holder is None:
                return
            if holder.host == host and not _process_runs(holder.pid, holder.process_started_at):
                gone = holder.instance_id  # e.g. this container before it restarted: no need to wait
                continue
            if now - started > timing.stale_s + timing.renew_s:
                raise WorkerIdInUse(
                    f"worker.id '{worker_id}' is in use by another running worker on this billing database "
                    f"(it renewed its claim {now - holder.seen_at:.0f} s ago); give each worker its own worker.id"
                )
            if waited_for != holder.instance_id:
                waited_for = holder.instance_id
                logger.warning(
                    "worker.id is claimed by another worker; waiting for its claim to lapse",
                    extra={"worker_id": worker_id, "seen_s_ago": round(now - holder.seen_at, 1),
                           "lapses_after_s": timing.stale_s},
                )
            await asyncio.sleep(timing.retry_s)

    def start_renewing(self) -> None:
        self.renewal = asyncio.create_task(self.renew(), name="billing-worker-claim")

    async def renew(self) -> None:
        """Renew the claim every `renew_s` until it is found taken over."""
        assert self.instance_id is not None
        while True:
            await asyncio.sleep(self.timing.renew_s)
            try:
                held = await self.store.renew_worker_claim(self.worker_id, self.instance_id, self.clock())
            except Exception as error:  # noqa: BLE001  the database is unreachable for now; the next round tries again
                logger.warning("cannot renew the worker id's claim", extra={"error": repr(error)})
                continue
            if not held:
                logger.error(
                    "another worker took over this worker id after this one went unheard for %g s; refusing "
                    "requests from now on, since the other worker may release the balance held for them; give "
                    "each worker its own worker.id", self.timing.stale_s, extra={"worker_id": self.worker_id},
                )
                await self.mark_lost()
                return

    def when_lost(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Call `callback` once this worker id is found taken over (the node drains on it)."""
        self._on_lost = callback

    async def mark_lost(self) -> None:
        """From now on refuse requests (WorkerIdTakenOver), and tell whoever asked to be told."""
        if self.lost:
            return
        self.lost = True
        try:
            if self._on_lost is not None:
                await self._on_lost()
        except Exception:
            logger.exception("worker id takeover callback failed")

    async def stop_renewing(self) -> None:
        if self.renewal is not None:
            self.renewal.cancel()
            await asyncio.gather(self.renewal, return_exceptions=True)

    async def release(self) -> None:
        """Let the next worker with this id start at once (after this one's ledger is flushed)."""
        if self.instance_id is None:
            return
        try:
            await self.store.release_worker_claim(self.worker_id, self.instance_id)
        except Exception as error:  # noqa: BLE001  the claim lapses by itself; stopping must go on
            logger.warning("cannot release the worker id's claim", extra={"error": repr(error)})


def _process_runs(pid: int, started_at: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started_at) < 0.05
    except psutil.Error as error:
        # Gone: it does not run. Not ours to inspect: assume it runs, and wait for its claim to lapse.
        return not isinstance(error, psutil.NoSuchProcess)
