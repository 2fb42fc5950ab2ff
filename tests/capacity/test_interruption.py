"""Ending a replica's in-flight requests at once (restart, shutdown) without touching later ones."""

from __future__ import annotations

import asyncio

from tests.capacity.capacity_support import IdleEngine, in_memory_model
from worker.engines.base import ReplicaSpec
from worker.engines.replica import Replica
from worker.gateway.relay import Outcome, race


def _replica() -> Replica:
    return Replica(IdleEngine(ReplicaSpec(model=in_memory_model(), index=0, host="127.0.0.1", port=1)))


async def test_interrupting_ends_only_the_requests_leased_before() -> None:
    replica = _replica()
    before = replica.lease()
    replica.interrupt_requests("engine restarting")
    after = replica.lease()
    assert before.interrupted.is_set() and before.interruption_reason == "engine restarting"
    assert not after.interrupted.is_set()
    assert replica.in_flight == 2
    before.release()
    after.release()
    assert replica.in_flight == 0


async def test_race_cancels_work_when_interrupted() -> None:
    replica = _replica()
    lease = replica.lease()
    work = asyncio.ensure_future(asyncio.sleep(60))
    racing = asyncio.ensure_future(race(work, interrupted=lease.interrupted))
    await asyncio.sleep(0)
    replica.interrupt_requests("shutting down")
    assert await racing is Outcome.interrupted
    assert work.cancelled()


async def test_race_leaves_slow_work_running_on_timeout() -> None:
    work = asyncio.ensure_future(asyncio.sleep(0.2, result="answer"))
    assert await race(work, interrupted=asyncio.Event(), timeout_s=0.01) is Outcome.timed_out
    assert await work == "answer"


async def test_race_reports_a_client_disconnect() -> None:
    async def receive() -> dict:
        return {"type": "http.disconnect"}

    work = asyncio.ensure_future(asyncio.sleep(60))
    assert await race(work, receive=receive) is Outcome.disconnected
    assert work.cancelled()


async def test_already_interrupted_lease_never_starts_waiting() -> None:
    replica = _replica()
    lease = replica.lease()
    replica.interrupt_requests("gone")
    work = asyncio.ensure_future(asyncio.sleep(60))
    assert await race(work, interrupted=lease.interrupted) is Outcome.interrupted
    assert work.cancelled()
