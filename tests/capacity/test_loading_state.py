"""A replica whose engine is loading: `loading` with its progress in /capacity, readiness and the registry summary."""

from __future__ import annotations

from tests.capacity.capacity_support import IdleEngine, in_memory_model
from worker.capacity import CapacityMonitor
from worker.config import NodeConfig
from worker.engines.base import ReplicaSpec
from worker.engines.loading import LoadPhase, LoadProgress, LoadUnit
from worker.engines.replica import Replica, ReplicaState
from worker.registry.payloads import summarise_capacity


async def _never_hung(replica: Replica, reason: str) -> None:
    raise AssertionError("not expected")


def _monitor(*states: ReplicaState) -> tuple[CapacityMonitor, list[Replica]]:
    config = NodeConfig(worker={"id": "w"}, models=[in_memory_model()])  # type: ignore[arg-type]
    replicas = []
    for index, state in enumerate(states):
        replica = Replica(IdleEngine(ReplicaSpec(model=config.models[0], index=index, host="127.0.0.1", port=1)))
        replica.set_state(state)
        replicas.append(replica)
    return CapacityMonitor(config, {"acme/m": replicas}, on_hung=_never_hung), replicas


def test_a_starting_replica_is_loading_with_no_progress_until_its_engine_reports_some() -> None:
    monitor, _ = _monitor(ReplicaState.starting)
    [view] = monitor.document().models[0].replicas
    assert view.state == "loading"
    assert view.loading is not None and view.loading.phase is None and view.loading.elapsed_s >= 0
    assert monitor.document().models[0].state == "loading"


def test_the_engines_progress_shows_in_capacity_readiness_and_the_registry_summary() -> None:
    monitor, [loading, other] = _monitor(ReplicaState.starting, ReplicaState.starting)
    loading.engine.load_progress = LoadProgress(phase=LoadPhase.loading_weights, done=3, total=4,
                                                unit=LoadUnit.shards)
    other.engine.load_progress = LoadProgress(phase=LoadPhase.downloading, done=1, total=4, unit=LoadUnit.bytes)

    document = monitor.document()
    view = document.models[0].replicas[0].loading
    assert view is not None
    assert (view.phase, view.done, view.total, view.unit, view.fraction) == ("loading_weights", 3, 4, "shards", 0.75)

    ready, detail = monitor.readiness()
    assert not ready
    assert detail["models"] == {"acme/m": ["loading", "loading"]}
    assert detail["loading"][loading.replica_id]["fraction"] == 0.75  # type: ignore[index]

    summary = summarise_capacity(document.model_dump())
    assert summary is not None
    assert summary.models[0].state == "loading" and summary.models[0].loading_fraction == 0.25


def test_a_ready_replica_shows_no_loading_even_with_progress_left_from_its_start() -> None:
    monitor, [replica] = _monitor(ReplicaState.ready)
    replica.engine.load_progress = LoadProgress(phase=LoadPhase.loading_weights, done=4, total=4,
                                                unit=LoadUnit.shards)
    [view] = monitor.document().models[0].replicas
    assert view.state != "loading" and view.loading is None
    assert "loading" not in monitor.readiness()[1]
