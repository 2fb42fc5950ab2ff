"""Admission: take a request only while some replica can batch it soon; otherwise refuse it at once.

Everything here is synchronous and reads state already in memory (the gateway's in-flight counts and
the engines' last scrapes), so a refusal costs microseconds and the engine never sees the request.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.capacity.context_length import check_context_length
from worker.capacity.drain import DrainState
from worker.config.models import ModelConfig
from worker.gateway.context import RequestContext
from worker.gateway.errors import ApiError
from worker.gateway.routing import ReplicaRouter

if TYPE_CHECKING:
    from worker.capacity.load import EngineLoad
    from worker.capacity.watchdog import ReplicaWatch
    from worker.engines.replica import Replica, ReplicaLease

MAX_RETRY_AFTER_S = 60
UNAVAILABLE_RETRY_AFTER_S = 5


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """Per-replica limits of one model (models.yaml `admission:`, defaults from `max_num_seqs`)."""

    enabled: bool
    max_num_seqs: int
    max_in_flight: int
    max_waiting: int
    max_kv_cache_usage: float
    stale_after_s: float
    late_admit_s: float = 0.0

    @classmethod
    def for_model(cls, model: ModelConfig, stale_after_s: float, late_admit_s: float = 0.0) -> AdmissionLimits:
        config = model.admission
        seqs = model.max_num_seqs
        allowance = config.queue_allowance if config.queue_allowance is not None else seqs // 32
        return cls(
            enabled=config.enabled,
            max_num_seqs=seqs,
            max_in_flight=config.max_in_flight or seqs + allowance,
            max_waiting=config.max_waiting or max(1, allowance),
            max_kv_cache_usage=config.max_kv_cache_usage,
            stale_after_s=stale_after_s,
            late_admit_s=late_admit_s,
        )

    def saturation(self, in_flight: int, load: EngineLoad | None, now: float) -> str | None:
        """Why the replica should take no more work now, or None when it can batch one more request soon.

        `load` is None for engines without metrics (external URLs): only the in-flight cap applies.
        """
        if in_flight >= self.max_in_flight:
            return "in_flight"
        if load is None:
            return None
        stats = load.stats
        if stats is None:
            return "stale_stats"  # flying blind counts as full
        age = now - stats.scraped_at
        if age > self.stale_after_s and (age > self.late_admit_s or in_flight >= self.max_num_seqs):
            # Late stats still admit a while when the gateway's own count shows a free batch slot: the
            # engine runs nothing the gateway did not send it.
            return "stale_stats"
        if self._queued_beyond_batch(stats.running, stats.waiting) >= self.max_waiting:
            return "engine_queue"
        if stats.kv_cache_usage >= self.max_kv_cache_usage:
            return "kv_cache"
        return None

    def _queued_beyond_batch(self, running: int, waiting: int) -> int:
        # Requests wait briefly between engine steps even with free batch slots; only those that
        # cannot get a slot are a queue.
        return waiting - max(0, self.max_num_seqs - running)

    def score(self, in_flight: int, load: EngineLoad | None) -> float:
        """Lower is less loaded."""
        kv_usage = load.stats.kv_cache_usage if load is not None and load.stats is not None else 0.0
        return in_flight / self.max_in_flight + kv_usage / 2

    def retry_after_s(self, in_flight: int, load: EngineLoad | None) -> int:
        """Whole seconds until the replica should have room again, from its recent drain rate."""
        ahead = in_flight - self.max_in_flight + 1
        if load is None:
            return 1
        if load.stats is not None:
            ahead = max(ahead, self._queued_beyond_batch(load.stats.running, load.stats.waiting) - self.max_waiting + 1)
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(load.seconds_until(ahead))))


class Admission:
    """Chooses the replica for each request (lowest load among those with room) or refuses it."""

    def __init__(self, watches: Mapping[str, Sequence[ReplicaWatch]], drain: DrainState) -> None:
        self.watches = watches
        self.drain = drain
        self.router = ReplicaRouter()
        # (model, reason) -> count. Reasons: in_flight, engine_queue, kv_cache, stale_stats (the replica
        # is full); unavailable, draining (503); context_length (400).
        self.rejections: Counter[tuple[str, str]] = Counter()

    def admit(self, ctx: RequestContext, exclude: Replica | None = None) -> ReplicaLease:
        """Lease a replica for `ctx`, or raise the ApiError to answer (400, 429 or 503)."""
        model_id = ctx.model.id
        if self.drain.draining:
            raise self._reject(model_id, "draining", ApiError(
                503, "this worker is draining and takes no new requests; retry on another worker",
                headers={"retry-after": str(UNAVAILABLE_RETRY_AFTER_S)}))
        try:
            check_context_length(ctx)
        except ApiError as error:
            raise self._reject(model_id, "context_length", error) from None
        now = time.monotonic()
        candidates: list[tuple[float, ReplicaWatch]] = []
        retry_after: int | None = None
        full_because = ""  # why the replica that frees up first is full
        routable = 0
        for watch in self.watches.get(model_id, ()):
            replica = watch.replica
            if replica is exclude or not watch.routable:
                continue
            routable += 1
            limits, load = watch.limits, watch.metered_load
            reason = limits.saturation(replica.in_flight, load, now) if limits.enabled else None
            if reason is not None:
                wait = limits.retry_after_s(replica.in_flight, load)
                if retry_after is None or wait < retry_after:
                    retry_after, full_because = wait, reason
                continue
            candidates.append((limits.score(replica.in_flight, load), watch))
        chosen = self.router.choose(candidates)
        if chosen is not None:
            lease = chosen.replica.lease()
            ctx.response_headers.update(chosen.load_headers())
            return lease
        if routable == 0:
            raise self._reject(model_id, "unavailable", ApiError(
                503, f"no replica of model '{model_id}' is ready; retry shortly",
                headers={"retry-after": str(UNAVAILABLE_RETRY_AFTER_S)}))
        raise self._reject(model_id, full_because, ApiError(
            429, f"model '{model_id}' is at capacity on this worker; retry after {retry_after}s",
            code="rate_limit_exceeded", headers={"retry-after": str(retry_after or 1)}))

    def _reject(self, model_id: str, reason: str, error: ApiError) -> ApiError:
        self.rejections[(model_id, reason)] += 1
        return error
