"""Admission decisions on in-memory state: which replica, or which refusal, and never a wasted await."""

from __future__ import annotations

import time

import pytest

from tests.capacity.capacity_support import IdleEngine, in_memory_model
from worker.capacity import Admission, AdmissionLimits, EngineStats
from worker.capacity.drain import DrainState
from worker.capacity.watchdog import ReplicaWatch
from worker.config import ModelConfig
from worker.config.models import EngineHealthConfig
from worker.engines.base import ReplicaSpec
from worker.engines.replica import Replica, ReplicaState
from worker.gateway.context import RequestContext
from worker.gateway.errors import api_error
from worker.refusals import Refusal


async def _never_hung(replica: Replica, reason: str) -> None:
    raise AssertionError("not expected")


def _watch(model: ModelConfig, index: int, *, running: int = 0, waiting: int = 0, kv: float = 0.0,
           age_s: float = 0.0, drain_rate: float | None = None) -> ReplicaWatch:
    replica = Replica(IdleEngine(ReplicaSpec(model=model, index=index, host="127.0.0.1", port=1)))
    replica.set_state(ReplicaState.ready)
    health = EngineHealthConfig(stats_interval_s=0.2)
    watch = ReplicaWatch(replica, health, AdmissionLimits.for_model(model, health.stale_after_s), _never_hung)
    now = time.monotonic()
    if drain_rate is not None:  # two scrapes a second apart that finished `drain_rate` requests
        watch.load.record(EngineStats(running, waiting, kv, 0, 0, 0, 0, now - age_s - 1))
        watch.load.record(EngineStats(running, waiting, kv, 1, 0, 0, drain_rate, now - age_s))
    else:
        watch.load.record(EngineStats(running, waiting, kv, 0, 0, 0, 0, now - age_s))
    return watch


def _ctx(model: ModelConfig, **body: object) -> RequestContext:
    body = {"model": model.id, "messages": [{"role": "user", "content": "hi"}], **body}
    return RequestContext(request_id="r", endpoint="chat.completions", model=model, body=body, stream=False,
                          client_wants_usage=False, headers={})


def _admission(*watches: ReplicaWatch) -> Admission:
    return Admission({"acme/m": list(watches)}, DrainState())


def test_default_limits_derive_from_max_num_seqs() -> None:
    limits = AdmissionLimits.for_model(in_memory_model(), stale_after_s=0.6)
    assert (limits.max_num_seqs, limits.max_in_flight, limits.max_waiting) == (8, 8, 1)
    big = AdmissionLimits.for_model(in_memory_model().model_copy(update={"engine_args": {"max_num_seqs": 256}}), 0.6)
    assert (big.max_in_flight, big.max_waiting) == (264, 8)
    custom = AdmissionLimits.for_model(in_memory_model(max_in_flight=3, max_waiting=5, max_kv_cache_usage=0.5), 1.0)
    assert (custom.max_in_flight, custom.max_waiting, custom.max_kv_cache_usage) == (3, 5, 0.5)


@pytest.mark.parametrize(("age_s", "in_flight", "running", "waiting", "reason"), [
    (1.5, 7, 0, 0, None),  # late, but the gateway's own count shows a free batch slot
    (1.5, 8, 0, 0, "stale_stats"),  # late, and as many open as batch slots: the engine may be full
    (1.5, 0, 8, 1, "engine_queue"),  # late, and what was last seen was a queue
    (6.0, 0, 0, 0, "stale_stats"),  # beyond the late window: flying blind counts as full
])
def test_late_stats_admit_only_while_the_gateway_sees_a_free_batch_slot(
        age_s: float, in_flight: int, running: int, waiting: int, reason: str | None) -> None:
    model = in_memory_model(max_in_flight=20)  # 8 batch slots, and room for a queue beyond them
    limits = AdmissionLimits.for_model(model, stale_after_s=0.6, late_admit_s=5.0)
    watch = _watch(model, 0, running=running, waiting=waiting, age_s=age_s)

    assert limits.saturation(in_flight, watch.load, time.monotonic()) == reason


def test_late_stats_are_saturated_at_once_when_the_late_window_is_off() -> None:
    limits = AdmissionLimits.for_model(in_memory_model(), stale_after_s=0.6, late_admit_s=0.0)
    watch = _watch(in_memory_model(), 0, age_s=0.7)

    assert limits.saturation(0, watch.load, time.monotonic()) == "stale_stats"


def test_the_late_window_comes_from_engine_health() -> None:
    assert EngineHealthConfig().stats_late_admit_s == 5.0
    assert EngineHealthConfig(stats_late_admit_s=0).stats_late_admit_s == 0


def test_lease_counts_in_flight_until_released() -> None:
    model = in_memory_model()
    watch = _watch(model, 0, running=1)
    ctx = _ctx(model)
    lease = _admission(watch).admit_now(ctx, may_queue=False)
    assert lease.replica is watch.replica and watch.replica.in_flight == 1
    assert ctx.response_headers["x-worker-running"] == "1"
    assert ctx.response_headers["x-worker-queue-depth"] == "0"
    assert ctx.response_headers["x-worker-kv-cache-usage"] == "0.000"
    lease.release()
    lease.release()
    assert watch.replica.in_flight == 0


def test_least_loaded_replica_wins() -> None:
    model = in_memory_model()
    busy, calm = _watch(model, 0), _watch(model, 1, kv=0.2)
    busy.replica.in_flight = 5
    admission = _admission(busy, calm)
    assert {admission.admit_now(_ctx(model), may_queue=False).replica for _ in range(3)} == {calm.replica}


def test_equal_replicas_take_turns() -> None:
    model = in_memory_model()
    first, second = _watch(model, 0), _watch(model, 1)
    admission = _admission(first, second)
    chosen = []
    for _ in range(4):
        lease = admission.admit_now(_ctx(model), may_queue=False)
        chosen.append(lease.replica)
        lease.release()
    assert set(chosen) == {first.replica, second.replica}


@pytest.mark.parametrize(("state", "reason"), [
    ({"in_flight": 8}, "in_flight"),
    ({"running": 8, "waiting": 1}, "engine_queue"),
    ({"kv": 0.96}, "kv_cache"),
    ({"age_s": 5.0}, "stale_stats"),
])
def test_saturated_replica_is_refused_with_429_and_retry_after(state: dict, reason: str) -> None:
    model = in_memory_model()
    in_flight = state.pop("in_flight", 0)
    watch = _watch(model, 0, drain_rate=0.5, **state)
    watch.replica.in_flight = in_flight
    limits = watch.limits
    assert limits.saturation(in_flight, watch.load, time.monotonic()) == reason
    admission = _admission(watch)
    with pytest.raises(Refusal) as caught:
        admission.admit_now(_ctx(model), may_queue=False)
    error = api_error(caught.value)
    assert error.status == 429 and error.code == "rate_limit_exceeded"
    assert int(error.headers["retry-after"]) >= 1
    assert admission.rejections == {("acme/m", reason): 1}
    assert watch.replica.in_flight == in_flight  # nothing leased


def test_retry_after_follows_the_drain_rate() -> None:
    model = in_memory_model()
    slow = _watch(model, 0, running=8, waiting=7, drain_rate=0.25)  # 7 to finish first, at 0.25 req/s
    assert slow.limits.retry_after_s(0, slow.load) == 28
    fast = _watch(model, 1, running=8, waiting=8, drain_rate=100.0)
    assert fast.limits.retry_after_s(0, fast.load) == 1


def test_waiting_with_free_batch_slots_is_no_queue() -> None:
    model = in_memory_model()
    watch = _watch(model, 0, running=2, waiting=5)  # 6 free slots: they join the next step
    assert watch.limits.saturation(0, watch.load, time.monotonic()) is None


def test_one_saturated_replica_sends_work_to_the_other() -> None:
    model = in_memory_model()
    full, free = _watch(model, 0, kv=0.99), _watch(model, 1)
    assert _admission(full, free).admit_now(_ctx(model), may_queue=False).replica is free.replica


def test_admission_off_lets_the_engine_queue() -> None:
    model = in_memory_model(enabled=False)
    watch = _watch(model, 0, running=8, waiting=50, kv=0.99)
    watch.replica.in_flight = 100
    assert _admission(watch).admit_now(_ctx(model), may_queue=False).replica is watch.replica


def test_no_ready_replica_is_503() -> None:
    model = in_memory_model()
    down = _watch(model, 0)
    down.replica.set_state(ReplicaState.restarting)
    unread = _watch(model, 1)
    unread.load.reset(time.monotonic())  # up, but its load not read yet
    admission = _admission(down, unread)
    with pytest.raises(Refusal) as caught:
        admission.admit_now(_ctx(model), may_queue=False)
    assert api_error(caught.value).status == 503 and api_error(caught.value).headers["retry-after"]
    assert admission.rejections[("acme/m", "unavailable")] == 1


def test_excluded_replica_is_skipped() -> None:
    model = in_memory_model()
    first, second = _watch(model, 0), _watch(model, 1)
    admission = _admission(first, second)
    chosen = [admission.admit_now(_ctx(model), exclude=first.replica, may_queue=False) for _ in range(3)]
    assert all(lease is not None and lease.replica is second.replica for lease in chosen)


def test_draining_is_503() -> None:
    model = in_memory_model()
    admission = _admission(_watch(model, 0))
    admission.drain.begin()
    with pytest.raises(Refusal) as caught:
        admission.admit_now(_ctx(model), may_queue=False)
    assert api_error(caught.value).status == 503 and api_error(caught.value).headers["retry-after"]
    assert admission.rejections[("acme/m", "draining")] == 1
    admission.drain.end()
    admission.admit_now(_ctx(model), may_queue=False)


def test_shutdown_drain_cannot_be_lifted() -> None:
    drain = DrainState()
    drain.begin(shutting_down=True)
    assert not drain.end() and drain.draining


def test_context_length_refusals_are_counted() -> None:
    model = in_memory_model()
    admission = _admission(_watch(model, 0))
    with pytest.raises(Refusal) as caught:
        admission.admit_now(_ctx(model, max_tokens=100_000), may_queue=False)
    assert api_error(caught.value).status == 400 and api_error(caught.value).code == "context_length_exceeded"
    assert admission.rejections[("acme/m", "context_length")] == 1
