"""Readiness, draining and admission refusals of the node, read from the capacity monitor at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

if TYPE_CHECKING:
    from worker.capacity import CapacityMonitor


class CapacityCollector:
    def __init__(self, capacity: CapacityMonitor) -> None:
        self.capacity = capacity

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        capacity = self.capacity
        yield GaugeMetricFamily("worker_ready", "1 while every model has a replica that takes work",
                                value=1.0 if capacity.is_ready() else 0.0)
        yield GaugeMetricFamily("worker_draining", "1 while the worker refuses new requests",
                                value=1.0 if capacity.drain.draining else 0.0)
        depth = GaugeMetricFamily("worker_queue_depth", "Requests queued in the worker for a batch slot",
                                  labels=["model"])
        oldest = GaugeMetricFamily("worker_queue_oldest_wait_seconds",
                                   "How long the oldest queued request has waited", labels=["model"])
        predicted = GaugeMetricFamily("worker_queue_predicted_wait_seconds",
                                      "Predicted wait for a batch slot of a request arriving now", labels=["model"])
        for model_id in capacity.admission.queues:
            queued, oldest_s, predicted_s = capacity.admission.queue_view(model_id)
            depth.add_metric([model_id], queued)
            oldest.add_metric([model_id], oldest_s or 0.0)
            if predicted_s is not None:
                predicted.add_metric([model_id], predicted_s)
        yield depth
        yield oldest
        yield predicted
        rejections = CounterMetricFamily("worker_admission_rejections",
                                         "Requests refused before reaching an engine, by reason",
                                         labels=["model", "reason"])
        for (model, reason), count in sorted(capacity.admission.rejections.items()):
            rejections.add_metric([model, reason], count)
        yield rejections
        hangs = CounterMetricFamily("worker_replica_hang_restarts",
                                    "Restarts of a replica found hung (no progress, or no answer to a probe)",
                                    labels=["model", "replica"])
        for watches in capacity.watches.values():
            for watch in watches:
                hangs.add_metric([watch.replica.model_id, watch.replica.replica_id], watch.hang_restarts)
        yield hangs
        yield from self._prefix_cache_hit_rates()

    def _prefix_cache_hit_rates(self) -> Iterator[Metric]:
        """Per replica, from its admission scrapes; a replica with nothing looked up yet has no sample."""
        recent = GaugeMetricFamily("worker_replica_prefix_cache_hit_rate",
                                   "Cached share of the prompt tokens the replica looked up over the last ~5 s",
                                   labels=["model", "replica"])
        lifetime = GaugeMetricFamily("worker_replica_prefix_cache_hit_rate_lifetime",
                                     "Cached share of the prompt tokens the replica looked up since its engine started",
                                     labels=["model", "replica"])
        for watches in self.capacity.watches.values():
            for watch in watches:
                load = watch.metered_load
                if load is None:
                    continue
                labels = [watch.replica.model_id, watch.replica.replica_id]
                if load.prefix_cache_hit_rate is not None:
                    recent.add_metric(labels, load.prefix_cache_hit_rate)
                if (ratio := load.prefix_cache_hit_rate_lifetime()) is not None:
                    lifetime.add_metric(labels, ratio)
        yield recent
        yield lifetime
