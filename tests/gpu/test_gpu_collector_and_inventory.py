"""Prometheus exposition, start-up GPU discovery and the probe script, against the fake backend."""

from __future__ import annotations

import json

import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.gpu import FakeNvmlBackend, GpuMetricsCollector, GpuMonitor, PynvmlBackend, detect_gpus
from worker.gpu.backend import RemappedRows
from worker.gpu.probe import probe


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_collector_exposes_latest_snapshot() -> None:
    backend = FakeNvmlBackend.with_gpus(2)
    gpu1 = backend.gpus[1]
    gpu1.temperature_c = 71
    gpu1.power_usage_mw = 512_250
    gpu1.memory_used_bytes = 40 * 1024**3
    gpu1.memory_reserved_bytes = 480 * 1024**2
    gpu1.utilization_gpu_percent = 87
    gpu1.clocks_event_reasons = 0x44
    gpu1.ecc_uncorrected_volatile = 0
    gpu1.pcie_replay_counter = 3
    gpu1.remapped_rows = RemappedRows(correctable=2, uncorrectable=0, pending=True, failure=False)
    backend.gpus[0].pcie_replay_counter = None
    monitor = GpuMonitor(backend)
    registry = CollectorRegistry()
    registry.register(GpuMetricsCollector(monitor))
    await monitor.poll_once()
    backend.inject_xid(1, 79)
    await monitor.drain_events()

    text = generate_latest(registry).decode()
    values = samples(registry)
    labels1 = (("gpu", "1"), ("uuid", gpu1.uuid))
    labels0 = (("gpu", "0"), ("uuid", backend.gpus[0].uuid))

    assert "vllm" not in text
    assert values[("worker_gpu_nvml_available", ())] == 1
    assert values[("worker_gpu_temperature_celsius", labels1)] == 71
    assert values[("worker_gpu_power_watts", labels1)] == pytest.approx(512.25)
    assert values[("worker_gpu_power_limit_watts", labels1)] == 700
    assert values[("worker_gpu_memory_used_bytes", labels1)] == 40 * 1024**3
    assert values[("worker_gpu_memory_reserved_bytes", labels1)] == 480 * 1024**2
    assert ("worker_gpu_memory_reserved_bytes", labels0) not in values  # NVML could not tell: left out
    assert values[("worker_gpu_memory_total_bytes", labels1)] == 80 * 1024**3
    assert values[("worker_gpu_utilization_ratio", labels1)] == pytest.approx(0.87)
    assert values[("worker_gpu_xid_last", labels1)] == 79
    assert values[("worker_gpu_xid_last", labels0)] == 0
    assert values[("worker_gpu_xid_events_total", labels1)] == 1
    assert values[("worker_gpu_ecc_uncorrected_volatile", labels1)] == 0
    assert values[("worker_gpu_remapped_rows_pending", labels1)] == 1
    assert values[("worker_gpu_remapped_rows_failed", labels1)] == 0
    assert values[("worker_gpu_throttle_reasons", labels1)] == 0x44
    assert values[("worker_gpu_pcie_replays_total", labels1)] == 3
    assert ("worker_gpu_pcie_replays_total", labels0) not in values  # not supported: left out
    assert values[("worker_gpu_health", labels1)] == 2
    assert values[("worker_gpu_health", labels0)] == 0
    assert "# TYPE worker_gpu_xid_events_total counter" in text
    assert "# TYPE worker_gpu_temperature_celsius gauge" in text
    await monitor.stop()


async def test_collector_without_nvml_reports_unavailable_only() -> None:
    monitor = GpuMonitor(FakeNvmlBackend(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    registry = CollectorRegistry()
    registry.register(GpuMetricsCollector(monitor))
    await monitor.start()

    values = samples(registry)

    assert values == {("worker_gpu_nvml_available", ()): 0}
    await monitor.stop()


def test_detect_gpus_lists_gpus_and_skips_unreadable_ones() -> None:
    backend = FakeNvmlBackend.with_gpus(3)
    backend.gpus[2].lost = True

    inventory = detect_gpus(backend)

    assert inventory.nvml_available and inventory.reason is None
    assert inventory.count == 2
    assert [(gpu.index, gpu.uuid) for gpu in inventory.gpus] == [(i, backend.gpus[i].uuid) for i in (0, 1)]
    assert inventory.gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert inventory.gpus[0].memory_total_bytes == 80 * 1024**3
    assert "GpuIsLost" in inventory.unreadable[2]
    assert backend.shutdown_calls == 1


def test_detect_gpus_without_driver_is_empty_with_reason() -> None:
    inventory = detect_gpus(FakeNvmlBackend(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED))

    assert not inventory.nvml_available
    assert inventory.count == 0
    assert inventory.reason is not None and "DriverNotLoaded" in inventory.reason


def test_real_backend_reports_missing_library_as_state(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_library() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)

    inventory = detect_gpus(PynvmlBackend())

    assert not inventory.nvml_available
    assert inventory.reason is not None and "LibraryNotFound" in inventory.reason


def test_detect_gpus_with_nvml_but_no_gpu() -> None:
    inventory = detect_gpus(FakeNvmlBackend([]))

    assert inventory.nvml_available
    assert inventory.count == 0
    assert inventory.reason == "NVML found no GPU"


async def test_probe_document_is_json() -> None:
    backend = FakeNvmlBackend.with_gpus(1)

    document = await probe(0, backend)

    parsed = json.loads(json.dumps(document))
    assert parsed["inventory"]["gpus"][0]["uuid"] == backend.gpus[0].uuid
    assert parsed["last_snapshot"]["nvml_state"] == "available"
    assert parsed["last_snapshot"]["gpus"][0]["readings"]["temperature_c"] == 40
    assert not backend.initialised


def test_real_backend_translates_nvml_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """PynvmlBackend against a stand-in NVML: values, units and the timeout-means-no-event rule."""
    handle = object()

    class EventData:
        device = handle
        eventType = pynvml.nvmlEventTypeXidCriticalError
        eventData = 79

    waits: list[int] = []

    def wait(event_set: object, timeout_ms: int) -> EventData:
        waits.append(timeout_ms)
        if len(waits) == 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        return EventData()

    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: handle)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetRemappedRows", lambda h: (4, 1, 1, 0))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", lambda h: 123_456)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetIndex", lambda h: 3 if h is handle else -1)
    monkeypatch.setattr(pynvml, "nvmlEventSetWait_v2", wait)
    backend = PynvmlBackend()

    rows = backend.remapped_rows(0)
    assert (rows.correctable, rows.uncorrectable, rows.pending, rows.failure) == (4, 1, True, False)
    assert backend.power_usage_mw(0) == 123_456
    assert backend.wait_event(object(), 250) is None
    event = backend.wait_event(object(), 250)
    assert event is not None
    assert (event.gpu_index, event.event_type, event.event_data) == (
        3,
        pynvml.nvmlEventTypeXidCriticalError,
        79,
    )
    assert waits == [250, 250]


class MemoryV2:
    total, reserved, used, free = 80 * 1024**3, 480 * 1024**2, 1011 * 1024**2, 79 * 1024**3


class MemoryV1:
    total, used, free = 80 * 1024**3, (1011 + 480) * 1024**2, 79 * 1024**3


def test_real_backend_reads_memory_without_the_drivers_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML's version 2 memory call keeps the driver's reserve out of "used", as nvidia-smi does."""
    versions: list[int | None] = []

    def memory_info(handle: object, version: int | None = None) -> object:
        versions.append(version)
        return MemoryV2() if version == pynvml.nvmlMemory_v2 else MemoryV1()

    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: object())
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", memory_info)

    memory = PynvmlBackend().memory_info(0)

    assert (memory.used_bytes, memory.reserved_bytes) == (1011 * 1024**2, 480 * 1024**2)
    assert versions == [pynvml.nvmlMemory_v2]


def test_real_backend_falls_back_to_memory_v1_on_an_older_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    versions: list[int | None] = []

    def memory_info(handle: object, version: int | None = None) -> object:
        versions.append(version)
        if version is not None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return MemoryV1()

    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: object())
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", memory_info)
    backend = PynvmlBackend()

    first, second = backend.memory_info(0), backend.memory_info(0)

    assert first == second
    assert (first.used_bytes, first.reserved_bytes) == ((1011 + 480) * 1024**2, None)
    assert versions == [pynvml.nvmlMemory_v2, None, None]  # version 2 tried once, then not again
