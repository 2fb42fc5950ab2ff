"""The relay processes that serve the worker's port when `worker.gateway_processes` is above 1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class GatewayProcessCollector(Collector):
    def __init__(self, processes: Callable[[], list[dict[str, Any]]]) -> None:
        self.processes = processes  # GatewayProcesses.describe

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("worker_gateway_process_up", "1 while the gateway process serves the port",
                               labels=["process"])
        in_flight = GaugeMetricFamily("worker_gateway_process_in_flight",
                                      "Requests the gateway process is relaying now", labels=["process"])
        requests = CounterMetricFamily("worker_gateway_process_requests",
                                       "Inference requests the gateway process received", labels=["process"])
        restarts = CounterMetricFamily("worker_gateway_process_restarts",
                                       "Times the gateway process exited and was started again", labels=["process"])
        cpu = CounterMetricFamily("worker_gateway_process_cpu_seconds",
                                  "CPU time the gateway process has used since it started", labels=["process"])
        for relay in self.processes():
            label = [str(relay["process"])]
            up.add_metric(label, 1.0 if relay["up"] else 0.0)
            in_flight.add_metric(label, relay["in_flight"])
            requests.add_metric(label, relay["requests"])
            restarts.add_metric(label, relay["restarts"])
            if relay["cpu_seconds"] is not None:
                cpu.add_metric(label, relay["cpu_seconds"])
        yield up
        yield in_flight
        yield requests
        yield restarts
        yield cpu
