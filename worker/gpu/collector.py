"""Prometheus exposition of the GPU monitor's latest snapshot, built at scrape time.

Register into the worker's own CollectorRegistry (never the global one):
    registry.register(GpuMetricsCollector(monitor))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.gpu.models import GpuFleetSnapshot, GpuStatus

_LABELS = ["gpu", "uuid"]
_Value = Callable[[GpuStatus], float | int | None]


def _remapped_rows(field: str) -> _Value:
    def value(gpu: GpuStatus) -> float | None:
        rows = gpu.readings.remapped_rows
        return None if rows is None else float(getattr(rows, field))

    return value


# (name, help, value); a None value leaves that GPU's sample out.
_GAUGES: list[tuple[str, str, _Value]] = [
    ("worker_gpu_temperature_celsius", "GPU core temperature", lambda g: g.readings.temperature_c),
    ("worker_gpu_power_watts", "Power draw", lambda g: g.readings.power_w),
    ("worker_gpu_power_limit_watts", "Enforced power limit", lambda g: g.readings.power_limit_w),
    ("worker_gpu_memory_used_bytes", "Device memory held by processes", lambda g: g.readings.memory_used_bytes),
    (
        "worker_gpu_memory_reserved_bytes",
        "Device memory held by the driver",
        lambda g: g.readings.memory_reserved_bytes,
    ),
    ("worker_gpu_memory_total_bytes", "Device memory", lambda g: g.readings.memory_total_bytes),
    ("worker_gpu_utilization_ratio", "GPU utilisation, 0-1", lambda g: g.readings.utilization_gpu_ratio),
    ("worker_gpu_xid_last", "Last XID seen (0 = none)", lambda g: g.xid_last or 0),
    (
        "worker_gpu_ecc_uncorrected_volatile",
        "Volatile uncorrected ECC error count (since driver load)",
        lambda g: g.readings.ecc_uncorrected_volatile,
    ),
    ("worker_gpu_remapped_rows_pending", "Row remap pending (1 = reset needed)", _remapped_rows("pending")),
    ("worker_gpu_remapped_rows_failed", "Row remap failed (1 = replace the GPU)", _remapped_rows("failure")),
    (
        "worker_gpu_throttle_reasons",
        "NVML clocks event reason bitmask",
        lambda g: g.readings.clocks_event_reasons,
    ),
    ("worker_gpu_health", "0 healthy, 1 degraded, 2 failed", lambda g: g.health.severity),
]
_COUNTERS: list[tuple[str, str, _Value]] = [
    ("worker_gpu_xid_events", "XID events seen by this process", lambda g: g.xid_count),
    ("worker_gpu_pcie_replays", "PCIe replay counter", lambda g: g.readings.pcie_replay_count),
]


class SnapshotSource(Protocol):
    def snapshot(self) -> GpuFleetSnapshot: ...


class GpuMetricsCollector(Collector):
    def __init__(self, monitor: SnapshotSource) -> None:
        self._monitor = monitor

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("worker_gpu_nvml_available", "1 when NVML answers on this node")
        for name, help_text, _ in _GAUGES:
            yield GaugeMetricFamily(name, help_text, labels=_LABELS)
        for name, help_text, _ in _COUNTERS:
            yield CounterMetricFamily(name, help_text, labels=_LABELS)

    def collect(self) -> Iterator[Metric]:
        snapshot = self._monitor.snapshot()
        yield GaugeMetricFamily(
            "worker_gpu_nvml_available",
            "1 when NVML answers on this node",
            value=1 if snapshot.nvml_available else 0,
        )
        families: list[tuple[GaugeMetricFamily | CounterMetricFamily, _Value]] = [
            (GaugeMetricFamily(name, help_text, labels=_LABELS), value) for name, help_text, value in _GAUGES
        ]
        families += [
            (CounterMetricFamily(name, help_text, labels=_LABELS), value)
            for name, help_text, value in _COUNTERS
        ]
        for family, value in families:
            for gpu in snapshot.gpus:
                sample = value(gpu)
                if sample is not None:
                    family.add_metric([str(gpu.index), gpu.uuid], float(sample))
            yield family
