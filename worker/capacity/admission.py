"""Admission: bind a request to a replica that can batch it soon, queue it until one can, or refuse it.

Deciding reads only state already in memory (the gateway's in-flight counts, the engines' last scrapes,
the queue), so a refusal costs microseconds and the engine never sees the request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING

from worker.capacity.context_length import check_context_length
from worker.capacity.drain import DrainState
from worker.capacity.limits import MAX_RETRY_AFTER_S
from worker.capacity.placement import Placement
from worker.capacity.queue import FairQueue, Waiter
from worker.capacity.routing import ReplicaRouter
from worker.config.models import ModelConfig, RoutingConfig
from worker.gateway.context import RequestContext
from worker.refusals import AtCapacity, ContextTooLong, Draining, Refusal, Unavailable

if TYPE_CHECKING:
    from worker.capacity.prefix_index import PromptKey
    from worker.capacity.watchdog import ReplicaWatch
    from worker.engines.replica import Replica, ReplicaLease

# Weight of the newest finished request in the moving average of how long requests hold a slot.
SERVICE_WEIGHT = 0.1
UNAVAILABLE_RETRY_AFTER_S = 5
# How far past the head of the queue dispatch looks for a request whose prefix a freed replica holds.
LOOKAHEAD_PER_REPLICA = 4
MIN_LOOKAHEAD = 8


class Admission:
    """Binds each request to a replica with room, or queues it until one has room, or refuses it.

    A request is bound at once when a replica has room and nothing is queued ahead of it. Otherwise it
    waits in the model's fair queue while its predicted wait is within the model's first-token objective;
    it is refused with 429 when the prediction exceeds the objective, when the queue's memory bounds are
    reached, or when it is still queued at its deadline. Every refusal comes before any byte is sent.
    """

    def __init__(self, watches: Mapping[str, Sequence[ReplicaWatch]], drain: DrainState,
                 models: Sequence[ModelConfig] = (), clock: Callable[[], float] = time.monotonic) -> None:
        self.watches = watches
        self.drain = drain
        self.clock = clock
        self.router = ReplicaRouter()
        self.models = {model.id: model for model in models}
        self.queues: dict[str, FairQueue] = {model_id: FairQueue() for model_id in watches}
        self.placement = {model_id: Placement(self.models[model_id].routing if model_id in self.models
                                              else RoutingConfig(), [w.replica for w in model_watches])
                          for model_id, model_watches in watches.items()}
        # (model, reason) -> count. Reasons: in_flight, engine_queue, kv_cache, stale_stats (every replica
        # full and the request may not queue); predicted_wait, queue_full, queue_deadline (the queue's);
        # unavailable, draining (503); context_length (400).
        self.rejections: Counter[tuple[str, str]] = Counter()
        self._kicks: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # How long a request holds a batch slot, per model (moving average of finished leases).
        self.service_s: dict[str, float] = {}
        for model_id, model_watches in watches.items():
            for watch in model_watches:
                # A freed slot or a fresh scrape may let the head of the queue in.
                watch.replica.on_free = partial(self._freed, model_id)
                watch.on_update = partial(self.kick, model_id)
                watch.on_new_instance = partial(self.placement[model_id].forget, watch.replica.replica_id)

    # -- binding ----------------------------------------------------------------------------------

    def admit_now(self, ctx: RequestContext, exclude: Replica | None = None, *,
                  may_queue: bool = True) -> ReplicaLease | None:
        """A lease when a replica has room and nothing waits ahead; None when the request should queue
        (`wait_for_slot`); or the refusal raised (draining, too long, no replica ready, full). With
        `may_queue=False` (or `exclude`) it never returns None: a full model is refused with 429."""
        model_id = ctx.model.id
        if self.drain.draining:
            raise self._reject(model_id, "draining", Draining(
                "this worker is draining and takes no new requests; retry on another worker",
                retry_after_s=UNAVAILABLE_RETRY_AFTER_S))
        try:
            check_context_length(ctx)
        except ContextTooLong as error:
            raise self._reject(model_id, "context_length", error) from None
        queue = self.queues.get(model_id)
        if queue is None or not queue.depth or exclude is not None:
            lease = self._bind(ctx, exclude, hold=may_queue and exclude is None and queue is not None)
            if lease is not None:
                return lease
        routable = [w for w in self.watches.get(model_id, ()) if w.routable and w.replica is not exclude]
        if not routable:
            raise self._reject(model_id, "unavailable", Unavailable(
                f"no replica of model '{model_id}' is ready; retry shortly",
                retry_after_s=UNAVAILABLE_RETRY_AFTER_S))
        if may_queue and exclude is None and queue is not None:
            return None
        now = self.clock()
        full = [(w.limits.retry_after_s(w.replica.in_flight, w.metered_load),
                 w.limits.saturation(w.replica.in_flight, w.metered_load, now) or "in_flight")
                for w in routable]
        retry_after, reason = min(full)
        raise self._reject(model_id, reason, _at_capacity(model_id, retry_after))

    def _with_room(self, model_id: str, exclude: Replica | None) -> list[tuple[float, ReplicaWatch]]:
        """(load score, watch) of every routable replica that can batch one more request soon."""
        now = self.clock()
        candidates: list[tuple[float, ReplicaWatch]] = []
        for watch in self.watches.get(model_id, ()):
            replica = watch.replica
            if replica is exclude or not watch.routable:
                continue
            limits, load = watch.limits, watch.metered_load
            if limits.enabled and limits.saturation(replica.in_flight, load, now) is not None:
                continue
            candidates.append((limits.score(replica.in_flight, load), watch))
        return candidates

    def _bind(self, ctx: RequestContext, exclude: Replica | None, *, hold: bool = False) -> ReplicaLease | None:
        """A lease on a replica with room, or None when none has room (or, with `hold`, when the replicas
        holding the prompt's prefix are full and it is worth waiting for one of them)."""
        model_id = ctx.model.id
        candidates = self._with_room(model_id, exclude)
        if not candidates:
            return None
        key = None
        if hold and self._hold_s(model_id) > 0:
            key = self.placement[model_id].prompt_key(ctx)
            if self._waits_for_its_prefix(ctx, key, candidates):
                return None
        return self._lease(ctx, candidates, key)

    def _lease(self, ctx: RequestContext, candidates: Sequence[tuple[float, ReplicaWatch]],
               key: PromptKey | None) -> ReplicaLease:
        model_id = ctx.model.id
        chosen = self.placement[model_id].choose(ctx, candidates, self.router, key)
        lease = chosen.replica.lease()
        headers = ctx.response_headers
        headers.update(chosen.load_headers())
        headers["x-worker-queued"] = str(self.queues[model_id].depth)
        return lease

    def _waits_for_its_prefix(self, ctx: RequestContext, key: PromptKey | None,
                              candidates: Sequence[tuple[float, ReplicaWatch]]) -> bool:
        """True when the replicas holding the prompt's prefix are all full, no replica with room holds half
        as much of it (`Placement.worth_waiting_for`), and one of them, once it frees a slot, would still be
        within the load margin of the least loaded replica with room (placement would choose it then; beyond
        the margin load wins, so there is nothing to wait for)."""
        model_id = ctx.model.id
        placement = self.placement[model_id]
        watches = [w for w in self.watches.get(model_id, ()) if w.routable]
        wanted = placement.worth_waiting_for(ctx, key, [w.replica.replica_id for w in watches],
                                             {watch.replica.replica_id for _, watch in candidates})
        if not wanted:
            return False
        least = min(score for score, _ in candidates)
        return any(w.limits.score(w.replica.in_flight - 1, w.metered_load) - least <= placement.routing.load_margin
                   for w in watches if w.replica.replica_id in wanted)

    def _hold_s(self, model_id: str) -> float:
        """How long a queued request may wait for a replica that holds its prefix while another has room:
        about the time until that replica frees its next slot (a request's time in a slot over the
        replica's slots), so that waiting costs less than recomputing the prefix elsewhere."""
        service = self.service_s.get(model_id)
        model = self.models.get(model_id)
        if service is None or model is None or model.routing.policy != "cache_aware":
            return 0.0
        return min(service / model.max_num_seqs, model.admission.ttft_objective_s / 4)

    # -- queueing ---------------------------------------------------------------------------------

    async def wait_for_slot(self, ctx: RequestContext, size_bytes: int = 0) -> ReplicaLease:
        """Queue `ctx` until a replica has room for it; raises the 429 that refuses it.

        Cancelled (its client left): it leaves the queue, or gives back the lease it was just granted.
        """
        model = ctx.model
        queue = self.queues[model.id]
        config = model.admission
        flow, priority = ctx.flow or "", ctx.priority
        now = self.clock()
        predicted = self.predicted_wait_s(model.id, flow, priority)
        if predicted is not None and predicted > config.ttft_objective_s:
            raise self._reject(model.id, "predicted_wait", _at_capacity(
                model.id, math.ceil(predicted - config.ttft_objective_s),
                f"its predicted wait of {predicted:.1f}s exceeds the first-token objective of "
                f"{config.ttft_objective_s:g}s"))
        if queue.depth >= config.max_queued or queue.size_bytes + size_bytes > config.max_queued_bytes:
            raise self._reject(model.id, "queue_full", _at_capacity(
                model.id, math.ceil(predicted or 1), "its queue is full"))
        waiter = Waiter(ctx, flow, priority, size_bytes, now, now + config.ttft_objective_s)
        queue.push(waiter)
        self.kick(model.id)
        granted = waiter.granted
        try:
            await asyncio.wait({granted}, timeout=max(0.0, waiter.deadline - self.clock()))
        except asyncio.CancelledError:
            queue.remove(waiter)
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                granted.result().release()  # bound while its client was leaving: the slot goes on
            granted.cancel()
            raise
        queue.remove(waiter)
        if granted.done():
            return granted.result()  # a lease, or the drain's refusal
        granted.cancel()
        raise self._reject(model.id, "queue_deadline", _at_capacity(
            model.id, math.ceil(self.predicted_wait_s(model.id, flow, priority) or 1),
            f"no batch slot came free within the first-token objective of {config.ttft_objective_s:g}s"))

    def _freed(self, model_id: str, held_s: float) -> None:
        self.record_service(model_id, held_s)
        self.kick(model_id)

    def record_service(self, model_id: str, held_s: float) -> None:
        previous = self.service_s.get(model_id)
        self.service_s[model_id] = held_s if previous is None else previous + SERVICE_WEIGHT * (held_s - previous)

    def kick(self, model_id: str) -> None:
        """Bind queued requests of `model_id` soon (once per loop turn, however many slots came free)."""
        queue = self.queues.get(model_id)
        if queue is None or not queue.depth or model_id in self._kicks:
            return
        self._kicks.add(model_id)
        asyncio.get_running_loop().call_soon(self._dispatch, model_id)

    def _dispatch(self, model_id: str) -> None:
        """Bind queued requests while replicas have room.

        A replica with room takes the first request in turn order (within a short lookahead) that it serves
        as well as any other: one whose prefix it holds, one no replica holds, or one whose prefix sits on a
        replica too loaded for placement to choose it (`_waits_for_its_prefix`). A request passed over
        this way waits for the replica holding its prefix, which it gets first when that replica frees a
        slot; it is passed over at most `lookahead` times. When nobody in the lookahead prefers a replica
        with room, the first request that has waited `_hold_s` takes it (no slot idles longer than that
        while requests wait). At saturation slots free one at a time, and taking the head regardless
        would put every request wherever a slot happens to free, recomputing its whole prefix.
        """
        self._kicks.discard(model_id)
        queue = self.queues[model_id]
        placement = self.placement[model_id]
        hold = self._hold_s(model_id)
        lookahead = max(MIN_LOOKAHEAD, LOOKAHEAD_PER_REPLICA * len(self.watches.get(model_id, ())))
        while queue.depth:
            candidates = self._with_room(model_id, None)
            if not candidates:
                return
            now = self.clock()
            chosen: Waiter | None = None
            abandoned = False
            passed_over: list[Waiter] = []
            for waiter in queue.in_turn_order(lookahead if hold > 0 else 1):
                if waiter.granted.done():  # its client left meanwhile
                    queue.remove(waiter)
                    abandoned = True
                    continue
                if not waiter.keyed:
                    waiter.prompt_key, waiter.keyed = placement.prompt_key(waiter.ctx), True
                if (hold <= 0 or waiter.passed_over >= lookahead
                        or not self._waits_for_its_prefix(waiter.ctx, waiter.prompt_key, candidates)):
                    chosen = waiter
                    break
                passed_over.append(waiter)
            if chosen is None:
                # Nobody in sight prefers a replica with room: the first whose hold ran out takes it.
                chosen = next((w for w in passed_over if now - w.enqueued_at >= hold), None)
                if chosen is None:
                    if abandoned:
                        continue
                    if passed_over:
                        self._kick_at(model_id, min(w.enqueued_at for w in passed_over) + hold - now)
                    return
            for waiter in passed_over:
                if waiter is chosen:
                    break
                waiter.passed_over += 1
            lease = self._lease(chosen.ctx, candidates, chosen.prompt_key)
            queue.pop(chosen)
            headers = chosen.ctx.response_headers
            headers["x-worker-queued"] = str(queue.depth)
            headers["x-worker-queue-wait-ms"] = f"{(now - chosen.enqueued_at) * 1000:.0f}"
            chosen.granted.set_result(lease)

    def _kick_at(self, model_id: str, delay_s: float) -> None:
        """Look at the queue again when the first hold for a full replica runs out."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay_s)
        timer = self._timers.get(model_id)
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._timers[model_id] = loop.call_at(when, self.kick, model_id)

    def predicted_wait_s(self, model_id: str, flow: str = "", priority: int = 0) -> float | None:
        """Seconds a new request of `flow` would wait for a batch slot: the requests it would wait behind
        (itself included), each holding one of the model's batch slots for as long as requests have lately
        held one (Little's law: slots / time held is the rate slots free up, whatever the occupancy the
        times were measured at). None until a request has finished."""
        queue = self.queues.get(model_id)
        if queue is None or not queue.depth:
            return 0.0
        service = self.service_s.get(model_id)
        slots = sum(w.limits.max_num_seqs for w in self.watches.get(model_id, ()) if w.routable)
        if service is None or slots == 0:
            return None
        return (queue.ahead_of(flow, priority) + 1) * service / slots

    def queue_view(self, model_id: str) -> tuple[int, float | None, float | None]:
        """(queued requests, seconds the oldest has waited, predicted wait of a new request)."""
        queue = self.queues.get(model_id)
        if queue is None:
            return 0, None, 0.0
        oldest = queue.oldest_enqueued_at()
        return queue.depth, None if oldest is None else self.clock() - oldest, self.predicted_wait_s(model_id)

    def queued(self) -> int:
        return sum(queue.depth for queue in self.queues.values())

    def refuse_queued(self, refusal: Refusal) -> int:
        """End every queued request with `refusal` (the drain's grace period is over)."""
        refused = 0
        for model_id, queue in self.queues.items():
            for waiter in queue.waiters():
                queue.remove(waiter)
                if not waiter.granted.done():
                    waiter.granted.set_exception(self._reject(model_id, "draining", refusal))
                    refused += 1
        return refused

    def _reject(self, model_id: str, reason: str, refusal: Refusal) -> Refusal:
        self.rejections[(model_id, reason)] += 1
        return refusal


def _at_capacity(model_id: str, retry_after_s: int, why: str = "") -> AtCapacity:
    retry_after = min(MAX_RETRY_AFTER_S, max(1, retry_after_s))
    because = f": {why}" if why else ""
    return AtCapacity(f"model '{model_id}' is at capacity on this worker{because}; retry after {retry_after}s",
                      retry_after_s=retry_after)
