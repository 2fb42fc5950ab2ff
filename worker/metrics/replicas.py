"""Replica states and restarts, read from the supervisor at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.engines.replica import Replica, ReplicaState


class ReplicaCollector(Collector):
    """`state_of` names a replica's state (default: its lifecycle state), one of `states`."""

    def __init__(self, replicas: Sequence[Replica], extra_states: Iterable[str] = (),
                 state_of: Callable[[Replica], str] | None = None, states: Iterable[str] | None = None) -> None:
        self.replicas = replicas
        base = list(states) if states is not None else [s.value for s in ReplicaState]
        self.states = base + [s for s in extra_states if s not in base]
        self.state_of = state_of or (lambda replica: replica.state.value)

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("worker_replica_state", "1 for the replica's current state",
                                  labels=["model", "replica", "state"])
        restarts = CounterMetricFamily("worker_replica_restarts", "Engine restarts of the replica",
                                       labels=["model", "replica"])
        in_flight = GaugeMetricFamily("worker_replica_in_flight", "Requests the gateway has open on the replica",
                                      labels=["model", "replica"])
        for replica in self.replicas:
            current = self.state_of(replica)
            for name in self.states:
                state.add_metric([replica.model_id, replica.replica_id, name], 1.0 if current == name else 0.0)
            restarts.add_metric([replica.model_id, replica.replica_id], replica.restarts)
            in_flight.add_metric([replica.model_id, replica.replica_id], replica.in_flight)
        yield state
        yield restarts
        yield in_flight
