"""Cache-aware late binding: a freed slot goes to the queued request whose prompt prefix that replica holds.

Two in-memory replicas of a cache_aware model; tenant A's long prompt is known to be cached on replica 0,
tenant B's on replica 1 (seeded into the approximate prefix index, as earlier requests would have).
"""

from __future__ import annotations

import asyncio

from tests.capacity.test_scheduler import _admission, _model, _watch
from worker.capacity import Admission
from worker.capacity.prefix_index import PromptKey
from worker.config import ModelConfig
from worker.engines.replica import ReplicaLease
from worker.gateway.context import RequestContext

PROMPTS = {tenant: f"tenant {tenant} instructions: " + " ".join(f"rule {n} of {tenant}." for n in range(120))
           for tenant in ("A", "B")}
SECONDS_IN_A_SLOT = 1.0  # how long requests have held a slot: one slot interval is 1.0 / 8 slots


def _ctx(model: ModelConfig, tenant: str | None, request_id: str = "r") -> RequestContext:
    content = PROMPTS[tenant] if tenant else "hi"
    body = {"model": model.id, "messages": [{"role": "system", "content": content}, {"role": "user", "content": "go"}]}
    ctx = RequestContext(request_id=request_id, endpoint="chat.completions", model=model, body=body,
                         stream=False, client_wants_usage=False, headers={})
    ctx.flow = "acct"
    return ctx


def _cluster(taken: tuple[int, int] = (8, 8)) -> tuple[ModelConfig, Admission, list[list[ReplicaLease]]]:
    """`taken` slots of 8 on replicas 0 and 1, A's prefix cached on replica 0 and B's on replica 1."""
    model = _model("cache_aware")
    watches = [_watch(model, 0), _watch(model, 1)]
    admission = _admission(model, *watches)
    placement = admission.placement[model.id]
    assert placement.index is not None
    for replica, tenant in ((watches[0].replica, "A"), (watches[1].replica, "B")):
        placement.index.record(replica.replica_id, placement.index.keys("chat.completions", _ctx(model, tenant).body))
    leases = [[w.replica.lease() for _ in range(count)] for count, w in zip(taken, watches, strict=True)]
    admission.record_service(model.id, SECONDS_IN_A_SLOT)
    return model, admission, leases


def _replica_index(lease: ReplicaLease) -> int:
    return lease.replica.spec.index


async def _queued(admission: Admission, ctx: RequestContext) -> asyncio.Future[ReplicaLease]:
    task = asyncio.ensure_future(admission.wait_for_slot(ctx))
    await asyncio.sleep(0)
    return task


async def test_a_freed_slot_goes_to_the_queued_request_whose_prefix_that_replica_holds() -> None:
    model, admission, leases = _cluster()
    a_turn = await _queued(admission, _ctx(model, "A", "a"))  # head of the queue; its prefix is on replica 0
    b_turn = await _queued(admission, _ctx(model, "B", "b"))
    leases[1].pop().release()  # replica 1 (B's) frees a slot
    done, _ = await asyncio.wait({b_turn}, timeout=5)
    assert done, "B's turn should have been bound to the replica holding its prefix"
    assert _replica_index(b_turn.result()) == 1
    assert not a_turn.done()  # A waits for its own replica rather than recomputing its prefix on replica 1
    leases[0].pop().release()
    done, _ = await asyncio.wait({a_turn}, timeout=5)
    assert done and _replica_index(a_turn.result()) == 0
    assert admission.queue_view(model.id)[0] == 0


async def test_a_request_is_passed_over_a_bounded_number_of_times() -> None:
    model, admission, leases = _cluster()
    a_turn = await _queued(admission, _ctx(model, "A", "a"))
    bound_to_b_replica = 0
    for number in range(40):
        if a_turn.done():
            break
        b_turn = await _queued(admission, _ctx(model, "B", f"b{number}"))
        leases[1].pop().release()
        await asyncio.wait({a_turn, b_turn}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        if b_turn.done():
            bound_to_b_replica += 1
            leases[1].append(b_turn.result())  # it keeps its slot: replica 1 stays full
    assert a_turn.done(), "A was passed over without end while replica 0 stayed full"
    assert _replica_index(a_turn.result()) == 1
    assert bound_to_b_replica >= 1  # it was passed over at first...
    assert bound_to_b_replica <= 8  # ...at most the lookahead (4 per replica, at least 8) times
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.cancel()


async def test_a_request_waits_up_to_one_slot_interval_for_the_replica_holding_its_prefix() -> None:
    model, admission, leases = _cluster(taken=(8, 6))
    # Replica 0 holds A's prefix but is full; replica 1 has room, and once replica 0 frees a slot its load
    # is within the load margin (0.25) of replica 1's. The request queues for replica 0...
    assert admission.admit_now(_ctx(model, "A")) is None
    a_turn = await _queued(admission, _ctx(model, "A", "a"))
    leases[0].pop().release()  # ...which frees a slot within the hold: it goes there
    done, _ = await asyncio.wait({a_turn}, timeout=5)
    assert done and _replica_index(a_turn.result()) == 0
    # When replica 0 stays full, the hold runs out and the request takes replica 1's free slot.
    second = await _queued(admission, _ctx(model, "A", "a2"))
    done, _ = await asyncio.wait({second}, timeout=5)
    assert done and _replica_index(second.result()) == 1
    # A prompt no replica holds is bound at once, where there is room.
    lease = admission.admit_now(_ctx(model, None))
    assert lease is not None and _replica_index(lease) == 1


async def test_a_request_does_not_wait_for_a_replica_that_load_would_overrule() -> None:
    model, admission, _ = _cluster(taken=(8, 2))
    # Replica 0 holds A's prefix but even with a free slot it would carry 7 of 8 against replica 1's 2:
    # beyond the load margin, load wins, so waiting for replica 0 gains nothing.
    lease = admission.admit_now(_ctx(model, "A"))
    assert lease is not None and _replica_index(lease) == 1


async def test_least_loaded_takes_the_head_of_the_queue_wherever_a_slot_frees() -> None:
    model = _model("least_loaded")
    watches = [_watch(model, 0), _watch(model, 1)]
    admission = _admission(model, *watches)
    leases = [[w.replica.lease() for _ in range(8)] for w in watches]
    admission.record_service(model.id, SECONDS_IN_A_SLOT)
    a_turn = await _queued(admission, _ctx(model, "A", "a"))
    b_turn = await _queued(admission, _ctx(model, "B", "b"))
    leases[1].pop().release()
    done, _ = await asyncio.wait({a_turn}, timeout=5)
    assert done and _replica_index(a_turn.result()) == 1
    assert not b_turn.done()
    b_turn.cancel()


async def test_a_request_does_not_wait_when_a_replica_with_room_holds_most_of_its_prefix() -> None:
    model, admission, _ = _cluster(taken=(8, 6))
    placement = admission.placement[model.id]
    assert placement.index is not None
    key = placement.index.keys("chat.completions", _ctx(model, "A").body)
    assert len(key.chain) >= 4
    # Replica 1 (with room) holds the first 60% of A's prompt; replica 0 (full) holds all of it: the rest is
    # cheaper to recompute than a slot is to wait for.
    placement.index.record(admission.watches[model.id][1].replica.replica_id,
                           PromptKey(key.chain[:len(key.chain) * 6 // 10], key.chunk_tokens))
    lease = admission.admit_now(_ctx(model, "A"))
    assert lease is not None and _replica_index(lease) == 1
