"""Replica up-time as the node records it: runs from start to stop, renewed by heartbeats, across restarts
of replicas and of the worker."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any

from tests.billing.support import chat_model
from worker.billing.store import LedgerStore, open_store
from worker.config import EngineKind
from worker.economics.compute import provisioned_gpu_s
from worker.economics.queries import uptime_runs
from worker.economics.uptime import UptimeRecorder
from worker.engines.replica import ReplicaState


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def replica(replica_id: str = "acme-chat-0", *, gpus: int = 2, engine: EngineKind = EngineKind.mock) -> Any:
    model = chat_model().model_copy(update={"gpus_per_replica": gpus, "engine": engine})
    return SimpleNamespace(replica_id=replica_id, model_id=model.id, state=ReplicaState.starting, restarts=0,
                           spec=SimpleNamespace(model=model))


def recorder(store: LedgerStore, replicas: list[Any], clock: Clock) -> UptimeRecorder:
    return UptimeRecorder(store, "node-1", replicas, asyncio.Event, clock=clock)


async def test_provisioned_time_survives_a_restart_and_a_crash_counts_to_the_last_heartbeat(db_url: str) -> None:
    store = await open_store(db_url)
    clock, chat = Clock(1000.0), replica()
    first = recorder(store, [chat], clock)
    first.observe()  # starting: the engine holds its GPUs from now
    clock.now, chat.state = 1010.0, ReplicaState.ready
    first.observe()
    clock.now = 1100.0
    await first.stop()
    await store.close()

    store = await open_store(db_url)  # the worker started again
    clock.now, chat.state = 2000.0, ReplicaState.starting
    second = recorder(store, [chat], clock)
    second.observe()
    await second.save()
    clock.now = 2030.0
    second.observe()  # a heartbeat
    await second.save()
    clock.now = 2500.0  # then the worker is killed: no stop, no more heartbeats
    await store.close()

    store = await open_store(db_url)
    try:
        runs = await uptime_runs(store, 0.0, 5000.0)
        assert [(r.started_at, r.ready_at, r.stopped_at, r.seen_at, r.gpus) for r in runs] == [
            (1000.0, 1010.0, 1100.0, 1100.0, 2), (2000.0, None, None, 2030.0, 2)]
        assert provisioned_gpu_s(runs, 0.0, 5000.0) == (100 + 30) * 2
        assert provisioned_gpu_s(runs, 1050.0, 2010.0) == (50 + 10) * 2
    finally:
        await store.close()


async def test_a_replica_restart_ends_one_run_and_begins_the_next(store: LedgerStore) -> None:
    clock, chat = Clock(100.0), replica(gpus=1)
    external = replica("outside-0", engine=EngineKind.external)
    uptime = recorder(store, [chat, external], clock)
    uptime.observe()
    clock.now, chat.state = 150.0, ReplicaState.restarting  # its engine died
    uptime.observe()
    clock.now, chat.state = 160.0, ReplicaState.starting
    uptime.observe()
    clock.now, chat.state, chat.restarts = 170.0, ReplicaState.starting, 1  # restarted between two looks
    uptime.observe()
    clock.now = 200.0
    await uptime.stop()
    runs = await uptime_runs(store, 0.0, 1000.0)
    assert [(r.replica_id, r.started_at, r.stopped_at) for r in runs] == [
        ("acme-chat-0", 100.0, 150.0), ("acme-chat-0", 160.0, 170.0), ("acme-chat-0", 170.0, 200.0)]
    assert provisioned_gpu_s(runs, 0.0, 1000.0) == 50 + 10 + 30  # the external engine holds no GPUs of ours


async def test_runs_that_could_not_be_saved_are_saved_later(store: LedgerStore) -> None:
    clock, chat = Clock(100.0), replica()
    uptime = recorder(store, [chat], clock)
    save = store.save_replica_uptime

    async def failing(runs: Any) -> None:
        raise OSError("database unreachable")

    store.save_replica_uptime = failing  # type: ignore[method-assign]
    uptime.observe()
    await uptime.save()
    store.save_replica_uptime = save  # type: ignore[method-assign]
    clock.now = 130.0
    await uptime.stop()
    saved = await uptime_runs(store, 0.0, 1000.0)
    assert [(r.started_at, r.stopped_at) for r in saved] == [(100.0, 130.0)]


async def test_the_watch_records_state_changes_as_they_happen(store: LedgerStore) -> None:
    chat = replica()
    supervisor = SimpleNamespace(state_changed=asyncio.Event())  # replaced at each change, as the supervisor does
    uptime = UptimeRecorder(store, "node-1", [chat], lambda: supervisor.state_changed, heartbeat_s=3600)
    uptime.start()
    for _ in range(100):
        if await uptime_runs(store, 0.0, 1e12):
            break
        await asyncio.sleep(0.01)
    chat.state = ReplicaState.ready
    changed, supervisor.state_changed = supervisor.state_changed, asyncio.Event()
    changed.set()
    for _ in range(100):
        runs = await uptime_runs(store, 0.0, 1e12)
        if runs[0].ready_at is not None:
            break
        await asyncio.sleep(0.01)
    await uptime.stop()
    (run,) = await uptime_runs(store, 0.0, 1e12)
    assert run.ready_at is not None and run.stopped_at is not None


async def test_a_save_cut_short_by_the_stop_is_made_again(store: LedgerStore) -> None:
    clock, chat = Clock(100.0), replica()
    uptime = recorder(store, [chat], clock)
    uptime.observe()
    clock.now, chat.state = 150.0, ReplicaState.restarting
    uptime.observe()  # the run ended; not saved yet
    save, entered = store.save_replica_uptime, asyncio.Event()

    async def hanging(runs: Any) -> None:
        entered.set()
        await asyncio.Event().wait()

    store.save_replica_uptime = hanging  # type: ignore[method-assign]
    saving = asyncio.create_task(uptime.save())
    await entered.wait()
    saving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await saving
    store.save_replica_uptime = save  # type: ignore[method-assign]
    await uptime.stop()
    assert [(r.started_at, r.stopped_at) for r in await uptime_runs(store, 0.0, 1000.0)] == [(100.0, 150.0)]
