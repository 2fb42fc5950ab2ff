"""Prometheus view of the registry client: calls by outcome, and whether the registry knows this worker."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from worker.registry.client import RegistryClient


class RegistryCollector:
    def __init__(self, client: RegistryClient) -> None:
        self.client = client

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        client = self.client
        yield GaugeMetricFamily("worker_registry_announced",
                                "1 while the registry has accepted this worker's announcement",
                                value=1.0 if client.announced else 0.0)
        calls = CounterMetricFamily("worker_registry_calls", "Registry calls by kind and final outcome",
                                    labels=["call", "outcome"])
        attempts = CounterMetricFamily("worker_registry_attempts",
                                       "HTTP requests sent to the registry, retries included", labels=["call"])
        last_success = GaugeMetricFamily("worker_registry_last_success_timestamp_seconds",
                                         "Unix time of the last successful registry call", labels=["call"])
        for kind, counts in client.counts.items():
            calls.add_metric([kind, "success"], counts.successes)
            calls.add_metric([kind, "failure"], counts.failures)
            attempts.add_metric([kind], counts.attempts)
            if counts.last_success_at is not None:
                last_success.add_metric([kind], counts.last_success_at)
        yield calls
        yield attempts
        yield last_success
