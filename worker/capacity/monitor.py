"""The node's capacity: one watcher per replica, admission, readiness, the /capacity document and drain."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from worker.capacity.admission import UNAVAILABLE_RETRY_AFTER_S, Admission
from worker.capacity.document import (
    CapacityDocument,
    CapacityState,
    GpuView,
    LoadingView,
    ModelCapacity,
    PortHolderView,
    QueueView,
    ReplicaCapacity,
)
from worker.capacity.drain import DrainState, finish_in_flight, in_flight
from worker.capacity.limits import AdmissionLimits
from worker.capacity.watchdog import HangHandler, ReplicaWatch
from worker.config.models import NodeConfig
from worker.engines.replica import Replica, ReplicaState
from worker.gpu import GpuFleetSnapshot, GpuHealth
from worker.refusals import Draining

logger = logging.getLogger(__name__)

_SERVING = (CapacityState.ready, CapacityState.saturated)
_LIFECYCLE_DOWN = (ReplicaState.unhealthy, ReplicaState.restarting, ReplicaState.port_in_use,
                   ReplicaState.stopped)


class CapacityMonitor:
    def __init__(self, config: NodeConfig, replicas_by_model: Mapping[str, Sequence[Replica]], *,
                 on_hung: HangHandler, gpu_snapshot: Callable[[], GpuFleetSnapshot] | None = None) -> None:
        self.config = config
        health = config.worker.engine_health
        self.watches: dict[str, list[ReplicaWatch]] = {
            model.id: [ReplicaWatch(replica, health, AdmissionLimits.for_model(
                model, health.stale_after_s, health.stats_late_admit_s), on_hung)
                       for replica in replicas_by_model.get(model.id, ())]
            for model in config.models
        }
        self._by_replica = {w.replica.replica_id: w for watches in self.watches.values() for w in watches}
        self.drain = DrainState()
        self.admission = Admission(self.watches, self.drain, config.models)
        self._gpu_snapshot = gpu_snapshot

    @property
    def replicas(self) -> list[Replica]:
        return [watch.replica for watch in self._by_replica.values()]

    async def start(self) -> None:
        for watch in self._by_replica.values():
            watch.start()

    async def stop(self) -> None:
        await asyncio.gather(*(watch.stop() for watch in self._by_replica.values()))

    # -- states ---------------------------------------------------------------------------------

    def _failed_gpus(self, snapshot: GpuFleetSnapshot | None) -> frozenset[int]:
        return frozenset(snapshot.failed_indices()) if snapshot is not None else frozenset()

    def _state(self, watch: ReplicaWatch, now: float, failed_gpus: frozenset[int]) -> CapacityState:
        replica = watch.replica
        if (replica.state in _LIFECYCLE_DOWN or replica.quarantine_reason is not None
                or failed_gpus.intersection(replica.spec.gpu_ids)):
            return CapacityState.draining if self.drain.draining and replica.state is ReplicaState.stopped \
                else CapacityState.unhealthy
        if self.drain.draining:
            return CapacityState.draining
        if replica.state is ReplicaState.starting:
            return CapacityState.loading
        if not watch.routable:
            return CapacityState.starting
        if watch.limits.saturation(replica.in_flight, watch.metered_load, now) is not None:
            return CapacityState.saturated
        return CapacityState.ready

    def state_of(self, replica: Replica) -> str:
        """The replica's capacity state (for metrics); GPU failures show once the supervisor acts on them."""
        watch = self._by_replica.get(replica.replica_id)
        if watch is None:
            return CapacityState.unhealthy.value
        return self._state(watch, time.monotonic(), frozenset()).value

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready while not draining and every model has a replica that takes work (saturated counts)."""
        now = time.monotonic()
        failed = self._failed_gpus(self._gpu_snapshot() if self._gpu_snapshot else None)
        states = {model_id: [self._state(w, now, failed) for w in watches]
                  for model_id, watches in self.watches.items()}
        ok = not self.drain.draining and all(any(s in _SERVING for s in model_states)
                                             for model_states in states.values())
        detail: dict[str, object] = {
            "draining": self.drain.draining,
            "models": {model_id: [s.value for s in model_states] for model_id, model_states in states.items()}}
        loading = {watch.replica.replica_id: view.model_dump(exclude_none=True)
                   for watch in self._by_replica.values()
                   if (view := _loading_view(watch.replica, now)) is not None}
        if loading:
            detail["loading"] = loading
        return ok, detail

    def is_ready(self) -> bool:
        return self.readiness()[0]

    # -- /capacity -------------------------------------------------------------------------------

    def document(self) -> CapacityDocument:
        now = time.monotonic()
        snapshot = self._gpu_snapshot() if self._gpu_snapshot else None
        failed = self._failed_gpus(snapshot)
        models = []
        for model in self.config.models:
            replicas = [self._replica_view(w, now, failed, snapshot) for w in self.watches.get(model.id, ())]
            depth, oldest, predicted = self.admission.queue_view(model.id)
            queue = QueueView(depth=depth, oldest_wait_s=_rounded(oldest), predicted_wait_s=_rounded(predicted),
                              ttft_objective_s=model.admission.ttft_objective_s)
            models.append(ModelCapacity(id=model.id, state=_model_state([r.state for r in replicas]),
                                        admission_enabled=model.admission.enabled,
                                        max_model_len=model.max_model_len, queue=queue,
                                        routing=model.routing.policy, replicas=replicas))
        ready = not self.drain.draining and all(m.state in ("ready", "saturated") for m in models)
        return CapacityDocument(
            worker_id=self.config.worker.id, ready=ready, draining=self.drain.draining, taken_at=time.time(),
            gpu_monitoring=snapshot.nvml_state if snapshot is not None else "not_started", models=models)

    def _replica_view(self, watch: ReplicaWatch, now: float, failed: frozenset[int],
                      snapshot: GpuFleetSnapshot | None) -> ReplicaCapacity:
        replica, load = watch.replica, watch.load
        stats = load.stats if watch.has_metrics else None
        return ReplicaCapacity(
            replica=replica.replica_id,
            state=self._state(watch, now, failed),
            lifecycle=replica.state.value,
            engine=replica.engine.kind,
            in_flight=replica.in_flight,
            max_in_flight=watch.limits.max_in_flight,
            max_num_seqs=watch.limits.max_num_seqs,
            running=stats.running if stats else None,
            waiting=stats.waiting if stats else None,
            kv_cache_usage=round(stats.kv_cache_usage, 4) if stats else None,
            output_tokens_per_s=round(load.output_tokens_per_s, 2) if stats else None,
            requests_finished_per_s=round(load.finished_per_s, 3) if stats else None,
            estimated_queue_wait_s=_rounded(load.estimated_queue_wait_s()) if stats else None,
            prefix_cache_hit_rate=_rounded(load.prefix_cache_hit_rate) if stats else None,
            prefix_cache_hit_rate_lifetime=_rounded(load.prefix_cache_hit_rate_lifetime()) if stats else None,
            stats_age_s=_rounded(load.age(now)) if stats else None,
            restarts=replica.restarts,
            hang_restarts=watch.hang_restarts,
            gpus=[_gpu_view(index, snapshot) for index in replica.spec.gpu_ids],
            loading=_loading_view(replica, now),
            port_holder=_port_holder_view(replica),
        )

    async def fetch_engine_pages(self, timeout: float = 2.0) -> None:
        """Fetch every serving engine's whole /metrics page, for `engine_scrapes` to re-export."""
        await asyncio.gather(*(watch.fetch_engine_page(timeout) for watch in self._by_replica.values()))

    def engine_scrapes(self) -> Iterable[tuple[str, str, str]]:
        """(model, replica, last /metrics page) of every replica whose page has been fetched."""
        for watch in self._by_replica.values():
            text = watch.load.engine_page
            if text is not None:
                yield watch.replica.model_id, watch.replica.replica_id, text

    # -- drain -----------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return in_flight(self.replicas)

    async def drain_for_shutdown(self, grace_s: float, hurry: asyncio.Event | None = None) -> None:
        """Refuse new work, give in-flight requests `grace_s` (until `hurry` is set), then end the rest."""
        self.drain.begin(shutting_down=True)
        logger.info("draining before shutdown", extra={"in_flight": self.in_flight, "grace_s": grace_s})
        ended = await finish_in_flight(
            self.replicas, grace_s, hurry, queued=self.admission.queued,
            refuse_queued=lambda: self.admission.refuse_queued(Draining(
                "this worker is shutting down; retry on another worker", retry_after_s=UNAVAILABLE_RETRY_AFTER_S)))
        logger.info("drained", extra={"ended_early": ended})


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _loading_view(replica: Replica, now: float) -> LoadingView | None:
    if replica.state is not ReplicaState.starting:
        return None
    elapsed_s = round(now - replica.state_since, 1)
    progress = replica.load_progress
    if progress is None:
        return LoadingView(elapsed_s=elapsed_s)
    fraction = progress.fraction
    return LoadingView(elapsed_s=elapsed_s, phase=progress.phase.value, done=progress.done, total=progress.total,
                       unit=progress.unit.value, fraction=None if fraction is None else round(fraction, 4))


def _port_holder_view(replica: Replica) -> PortHolderView | None:
    holder = replica.port_holder
    if replica.state is not ReplicaState.port_in_use or holder is None:
        return None
    return PortHolderView(port=holder.port, pid=holder.holder_pid, name=holder.holder_name)


def _model_state(states: list[CapacityState]) -> str:
    for wanted in (CapacityState.ready, CapacityState.saturated, CapacityState.draining, CapacityState.starting,
                   CapacityState.loading):
        if wanted in states:
            return wanted.value
    return "unavailable"


def _gpu_view(index: int, snapshot: GpuFleetSnapshot | None) -> GpuView:
    status = snapshot.gpu(index) if snapshot is not None else None
    if status is None:
        return GpuView(index=index, health="unknown")
    return GpuView(index=index, uuid=status.uuid, health=status.health.value,
                   reasons=[reason.code for reason in status.reasons if reason.health is not GpuHealth.HEALTHY],
                   xid_last=status.xid_last)
