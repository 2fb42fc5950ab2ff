"""The worker's queue: late binding, fairness across accounts, priority, predicted-wait admission, deadlines."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.capacity.capacity_support import IdleEngine, in_memory_model
from worker.capacity import Admission, AdmissionLimits, EngineStats
from worker.capacity.drain import DrainState
from worker.capacity.queue import FairQueue, Waiter
from worker.capacity.watchdog import ReplicaWatch
from worker.config import ModelConfig
from worker.config.models import EngineHealthConfig, RoutingConfig
from worker.engines.base import ReplicaSpec
from worker.engines.replica import Replica, ReplicaLease, ReplicaState
from worker.gateway.context import RequestContext
from worker.gateway.errors import api_error
from worker.refusals import Draining, Refusal


async def _never_hung(replica: Replica, reason: str) -> None:
    raise AssertionError("not expected")


def _model(policy: str = "least_loaded", **admission: Any) -> ModelConfig:
    # max_num_seqs 8, no queue allowance: a replica takes 8 requests before anything queues.
    return in_memory_model(**admission).model_copy(update={"routing": RoutingConfig(policy=policy)})


def _watch(model: ModelConfig, index: int = 0, drain_rate: float | None = None) -> ReplicaWatch:
    replica = Replica(IdleEngine(ReplicaSpec(model=model, index=index, host="127.0.0.1", port=1)))
    replica.set_state(ReplicaState.ready)
    health = EngineHealthConfig(stats_interval_s=0.2)
    watch = ReplicaWatch(replica, health, AdmissionLimits.for_model(model, 3600.0), _never_hung)
    now = time.monotonic()
    # A drain rate is only measured while the engine has work: one request running at both scrapes.
    running = 1 if drain_rate else 0
    watch.load.record(EngineStats(running, 0, 0.0, 0, 0, 0, 0, now - 1))
    watch.load.record(EngineStats(running, 0, 0.0, 1, 0, 0, drain_rate or 0, now))
    return watch


def _ctx(model: ModelConfig, flow: str = "acct-a", priority: int = 0, request_id: str = "r") -> RequestContext:
    body = {"model": model.id, "messages": [{"role": "user", "content": "hi"}]}
    ctx = RequestContext(request_id=request_id, endpoint="chat.completions", model=model, body=body,
                         stream=False, client_wants_usage=False, headers={})
    ctx.flow, ctx.priority = flow, priority
    return ctx


def _admission(model: ModelConfig, *watches: ReplicaWatch) -> Admission:
    return Admission({model.id: list(watches)}, DrainState(), [model])


def _fill(admission: Admission, model: ModelConfig, count: int) -> list[ReplicaLease]:
    leases = []
    for _ in range(count):
        lease = admission.admit_now(_ctx(model))
        assert lease is not None
        leases.append(lease)
    return leases


async def test_fair_queue_takes_turns_across_flows_and_serves_priority_first() -> None:
    model = _model()
    queue = FairQueue()
    now = time.monotonic()

    def waiter(flow: str, priority: int = 0) -> Waiter:
        return Waiter(_ctx(model, flow, priority, request_id=flow), flow, priority, 10, now, now + 5)

    for _ in range(3):
        queue.push(waiter("a"))
    queue.push(waiter("b"))
    queue.push(waiter("c", priority=1))
    assert (queue.depth, queue.size_bytes) == (5, 50)
    # A new request of flow b waits behind c (higher priority), its own queued one, and one turn of a.
    assert queue.ahead_of("b", 0) == 1 + 1 + 2
    order = []
    while (head := queue.peek()) is not None:
        queue.pop(head)
        order.append(head.flow)
    assert order == ["c", "a", "b", "a", "a"]
    assert (queue.depth, queue.size_bytes) == (0, 0)


async def _first_done(tasks: list[asyncio.Future[Any]], count: int) -> set[asyncio.Future[Any]]:
    """Wait until `count` of the tasks are done (not for a while: what is still pending is then checked)."""
    done: set[asyncio.Future[Any]] = set()
    while len(done) < count:
        finished, _ = await asyncio.wait(set(tasks) - done, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert finished, f"only {len(done)} of {count} done"
        done |= finished
    return done


async def test_a_burst_beyond_the_batch_waits_and_is_bound_as_slots_free() -> None:
    model = _model()
    admission = _admission(model, _watch(model))
    leases = _fill(admission, model, 8)
    assert admission.admit_now(_ctx(model)) is None  # full: it queues rather than being refused
    waiting = [asyncio.ensure_future(admission.wait_for_slot(_ctx(model), 100)) for _ in range(4)]
    await asyncio.sleep(0)
    assert admission.queue_view(model.id)[0] == 4
    assert not any(task.done() for task in waiting)
    leases[0].release()
    leases[1].release()
    done = await _first_done(waiting, 2)  # one freed slot, one bound request
    assert all(task.result().replica.in_flight == 8 for task in done)
    assert admission.queue_view(model.id)[0] == 2  # the other two still wait in the queue
    assert not any(task.done() for task in set(waiting) - done)
    for lease in leases[2:4]:
        lease.release()
    await asyncio.wait_for(asyncio.gather(*waiting), timeout=10)
    assert admission.queue_view(model.id)[0] == 0
    assert not admission.rejections


async def test_one_accounts_backlog_does_not_hold_back_anothers_first_request() -> None:
    model = _model()
    admission = _admission(model, _watch(model))
    leases = _fill(admission, model, 8)
    backlog = [asyncio.ensure_future(admission.wait_for_slot(_ctx(model, "big"))) for _ in range(20)]
    await asyncio.sleep(0)
    first = asyncio.ensure_future(admission.wait_for_slot(_ctx(model, "small")))
    await asyncio.sleep(0)
    served_before = 0
    for lease in leases:
        lease.release()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        if first.done():
            break
        served_before += sum(task.done() for task in backlog) - served_before
    assert first.done()
    assert served_before <= 1  # at most one request of the backlog went first
    for task in backlog:
        task.cancel()
    await asyncio.gather(*backlog, return_exceptions=True)


async def test_a_predicted_wait_beyond_the_objective_is_refused_with_429_and_retry_after() -> None:
    model = _model(ttft_objective_s=2.0)
    admission = _admission(model, _watch(model))
    assert admission.predicted_wait_s(model.id) == 0.0  # nothing queued
    leases = _fill(admission, model, 8)
    leases.pop().release()  # one request finished: a slot is held about as long as it was (~0 s)
    admission.service_s[model.id] = 4.0  # requests hold a slot 4 s: 8 slots free up 2 a second
    _fill(admission, model, 1)
    queued = [asyncio.ensure_future(admission.wait_for_slot(_ctx(model, f"f{i}"))) for i in range(3)]
    await asyncio.sleep(0)
    # Three queued ahead and this one: (3 + 1) / 2 = 2 s, within the objective. One more is not.
    assert admission.predicted_wait_s(model.id, "new") == pytest.approx(2.0)
    fourth = asyncio.ensure_future(admission.wait_for_slot(_ctx(model, "f3")))
    await asyncio.sleep(0)
    with pytest.raises(Refusal) as refused:
        await admission.wait_for_slot(_ctx(model, "f4"))
    assert api_error(refused.value).status == 429
    assert api_error(refused.value).code == "rate_limit_exceeded"
    assert int(api_error(refused.value).headers["retry-after"]) >= 1
    assert admission.rejections[(model.id, "predicted_wait")] == 1
    for task in [*queued, fourth]:
        task.cancel()
    await asyncio.gather(*queued, fourth, return_exceptions=True)


async def test_a_request_still_queued_at_its_deadline_gets_429() -> None:
    model = _model(ttft_objective_s=0.05)
    admission = _admission(model, _watch(model))
    _fill(admission, model, 8)
    with pytest.raises(Refusal) as refused:
        await admission.wait_for_slot(_ctx(model))
    assert api_error(refused.value).status == 429
    assert admission.rejections[(model.id, "queue_deadline")] == 1
    assert admission.queue_view(model.id)[0] == 0


async def test_the_queue_has_memory_bounds() -> None:
    model = _model(max_queued=2, max_queued_bytes=1000)
    admission = _admission(model, _watch(model))
    _fill(admission, model, 8)
    first = asyncio.ensure_future(admission.wait_for_slot(_ctx(model), 600))
    await asyncio.sleep(0)
    with pytest.raises(Refusal) as too_big:
        await admission.wait_for_slot(_ctx(model), 600)
    second = asyncio.ensure_future(admission.wait_for_slot(_ctx(model), 10))
    await asyncio.sleep(0)
    with pytest.raises(Refusal) as too_many:
        await admission.wait_for_slot(_ctx(model), 10)
    assert api_error(too_big.value).status == api_error(too_many.value).status == 429
    assert admission.rejections[(model.id, "queue_full")] == 2
    for task in (first, second):
        task.cancel()
    await asyncio.gather(first, second, return_exceptions=True)


async def test_a_request_whose_client_left_leaves_the_queue_and_holds_no_slot() -> None:
    model = _model()
    watch = _watch(model)
    admission = _admission(model, watch)
    leases = _fill(admission, model, 8)
    left = asyncio.ensure_future(admission.wait_for_slot(_ctx(model)))
    await asyncio.sleep(0)
    left.cancel()
    await asyncio.gather(left, return_exceptions=True)
    assert admission.queue_view(model.id)[0] == 0
    # Bound in the same turn as its client left: the slot goes back at once.
    late = asyncio.ensure_future(admission.wait_for_slot(_ctx(model)))
    await asyncio.sleep(0)
    leases[0].release()
    admission._dispatch(model.id)
    late.cancel()
    await asyncio.gather(late, return_exceptions=True)
    assert watch.replica.in_flight == 7


async def test_the_end_of_a_drain_refuses_what_is_still_queued_with_503() -> None:
    model = _model()
    admission = _admission(model, _watch(model))
    _fill(admission, model, 8)
    queued = asyncio.ensure_future(admission.wait_for_slot(_ctx(model)))
    await asyncio.sleep(0)
    admission.drain.begin(shutting_down=True)
    with pytest.raises(Refusal) as new:
        admission.admit_now(_ctx(model))
    assert api_error(new.value).status == 503
    assert admission.queued() == 1  # admitted before the drain: still bound if a slot frees in time
    assert admission.refuse_queued(Draining("shutting down")) == 1
    with pytest.raises(Refusal) as refused:
        await queued
    assert api_error(refused.value).status == 503


async def test_how_long_requests_hold_a_slot_is_learned_from_finished_leases() -> None:
    model = _model()
    admission = _admission(model, _watch(model))
    assert admission.predicted_wait_s(model.id, "a") == 0.0
    leases = _fill(admission, model, 8)
    queued = asyncio.ensure_future(admission.wait_for_slot(_ctx(model)))
    await asyncio.sleep(0)
    assert admission.predicted_wait_s(model.id, "b") is None  # nothing finished yet: no refusal on a guess
    leases[0].started -= 3.0  # held for 3 s
    leases[0].release()
    assert admission.service_s[model.id] == pytest.approx(3.0, abs=0.1)
    admission.record_service(model.id, 13.0)
    assert admission.service_s[model.id] == pytest.approx(4.0, abs=0.1)  # a moving average, not the last one
    lease = await queued
    assert lease.replica.in_flight == 8
