"""GpuMonitor health classification, driven deterministically through the fake NVML backend."""

from __future__ import annotations

import asyncio
import threading

import pynvml
import pytest

from worker.gpu import (
    FakeNvmlBackend,
    GpuFleetSnapshot,
    GpuHealth,
    GpuHealthChange,
    GpuHealthPolicy,
    GpuMonitor,
)
from worker.gpu.backend import RemappedRows

HW_THERMAL = pynvml.nvmlClocksEventReasonHwThermalSlowdown
SW_POWER_CAP = pynvml.nvmlClocksEventReasonSwPowerCap


class ManualClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def make_monitor(
    backend: FakeNvmlBackend, clock: ManualClock | None = None, policy: GpuHealthPolicy | None = None
) -> GpuMonitor:
    clock = clock or ManualClock()
    return GpuMonitor(
        backend,
        policy=policy,
        event_wait_ms=20,
        wall_clock=clock,
        monotonic=clock,
    )


def health(snapshot: GpuFleetSnapshot, index: int) -> GpuHealth:
    gpu = snapshot.gpu(index)
    assert gpu is not None
    return gpu.health


def reason_codes(snapshot: GpuFleetSnapshot, index: int) -> list[str]:
    gpu = snapshot.gpu(index)
    assert gpu is not None
    return [reason.code for reason in gpu.reasons]


async def test_first_poll_reads_every_gpu() -> None:
    backend = FakeNvmlBackend.with_gpus(2)
    backend.gpus[1].power_usage_mw = 350_500
    monitor = make_monitor(backend)

    snapshot = await monitor.poll_once()

    assert snapshot.nvml_state == "available"
    assert snapshot.driver_version == backend.driver
    assert [gpu.uuid for gpu in snapshot.gpus] == [gpu.uuid for gpu in backend.gpus]
    readings = snapshot.gpus[1].readings
    assert readings.power_w == pytest.approx(350.5)
    assert readings.power_limit_w == pytest.approx(700.0)
    assert readings.temperature_slowdown_c == 87
    assert readings.remapped_rows is not None and readings.remapped_rows.pending is False
    assert {health(snapshot, 0), health(snapshot, 1)} == {GpuHealth.HEALTHY}
    assert GpuFleetSnapshot.model_validate_json(snapshot.model_dump_json()) == snapshot
    await monitor.stop()


async def test_xid_79_fails_only_that_gpu_and_tells_subscribers() -> None:
    backend = FakeNvmlBackend.with_gpus(2)
    monitor = make_monitor(backend)
    changes: list[GpuHealthChange] = []
    monitor.subscribe(changes.append)
    await monitor.poll_once()

    backend.inject_xid(1, 79)
    assert await monitor.drain_events() == 1
    snapshot = monitor.snapshot()

    assert health(snapshot, 1) is GpuHealth.FAILED
    assert health(snapshot, 0) is GpuHealth.HEALTHY
    assert "xid_79" in reason_codes(snapshot, 1)
    assert snapshot.gpus[1].xid_last == 79 and snapshot.gpus[1].xid_count == 1
    assert snapshot.failed_indices() == [1]
    assert [(c.index, c.previous, c.current) for c in changes] == [(1, GpuHealth.HEALTHY, GpuHealth.FAILED)]

    # Sticky: healthy readings afterwards do not bring it back.
    snapshot = await monitor.poll_once()
    assert health(snapshot, 1) is GpuHealth.FAILED
    assert len(changes) == 1
    await monitor.stop()


async def test_event_thread_delivers_xid_while_running() -> None:
    backend = FakeNvmlBackend.with_gpus(2)
    monitor = make_monitor(backend)
    failed = asyncio.Event()
    seen: list[GpuHealthChange] = []

    async def on_change(change: GpuHealthChange) -> None:
        seen.append(change)
        if change.current is GpuHealth.FAILED:
            failed.set()

    monitor.subscribe(on_change)
    await monitor.start()
    try:
        backend.inject_xid(1, 79)
        await asyncio.wait_for(failed.wait(), timeout=30)
    finally:
        await monitor.stop()

    assert [(c.index, c.current) for c in seen] == [(1, GpuHealth.FAILED)]
    assert backend.shutdown_calls == 1
    assert not backend.initialised


@pytest.mark.parametrize(
    ("xid", "expected"),
    [
        (48, GpuHealth.FAILED),
        (95, GpuHealth.FAILED),
        (157, GpuHealth.FAILED),
        (94, GpuHealth.DEGRADED),
        (63, GpuHealth.DEGRADED),
        (92, GpuHealth.DEGRADED),
        (13, GpuHealth.HEALTHY),
        (43, GpuHealth.HEALTHY),
    ],
)
async def test_xid_classes(xid: int, expected: GpuHealth) -> None:
    backend = FakeNvmlBackend.with_gpus(1)
    monitor = make_monitor(backend)
    await monitor.poll_once()

    backend.inject_xid(0, xid)
    await monitor.drain_events()
    gpu = monitor.snapshot().gpus[0]

    assert gpu.health is expected
    assert gpu.xid_last == xid
    assert gpu.application_fault_xid_count == (1 if xid in {13, 43} else 0)
    assert gpu.recent_events[-1].xid == xid
    await monitor.stop()


async def test_xid_warning_clears_after_hold_window() -> None:
    backend = FakeNvmlBackend.with_gpus(1)
    clock = ManualClock()
    monitor = make_monitor(backend, clock, GpuHealthPolicy(degraded_hold_s=60))
    changes: list[GpuHealthChange] = []
    monitor.subscribe(changes.append)
    await monitor.poll_once()

    backend.inject_xid(0, 94)
    await monitor.drain_events()
    clock.now += 59
    assert health(await monitor.poll_once(), 0) is GpuHealth.DEGRADED
    clock.now += 2
    assert health(await monitor.poll_once(), 0) is GpuHealth.HEALTHY
    assert [c.current for c in changes] == [GpuHealth.DEGRADED, GpuHealth.HEALTHY]
    await monitor.stop()


async def test_ecc_increase_degrades_and_burst_fails() -> None:
    backend = FakeNvmlBackend.with_gpus(2)
    backend.gpus[0].ecc_uncorrected_volatile = 3  # already there at start: only a baseline
    clock = ManualClock()
    monitor = make_monitor(backend, clock, GpuHealthPolicy(ecc_burst_threshold=10, degraded_hold_s=60))
    assert health(await monitor.poll_once(), 0) is GpuHealth.HEALTHY

    backend.gpus[0].ecc_uncorrected_volatile = 5
    snapshot = await monitor.poll_once()
    assert health(snapshot, 0) is GpuHealth.DEGRADED
    assert reason_codes(snapshot, 0) == ["ecc_uncorrected_increase"]
    assert snapshot.gpus[0].readings.ecc_uncorrected_volatile == 5
    clock.now += 61
    assert health(await monitor.poll_once(), 0) is GpuHealth.HEALTHY

    backend.gpus[1].ecc_uncorrected_volatile = 12
    snapshot = await monitor.poll_once()
    assert health(snapshot, 1) is GpuHealth.FAILED
    assert "ecc_uncorrected_burst" in reason_codes(snapshot, 1)
    clock.now += 3600
    assert health(await monitor.poll_once(), 1) is GpuHealth.FAILED
    await monitor.stop()


async def test_thermal_throttle_degrades_while_active() -> None:
    backend = FakeNvmlBackend.with_gpus(1)
    monitor = make_monitor(backend)
    changes: list[GpuHealthChange] = []
    monitor.subscribe(changes.append)

    backend.gpus[0].clocks_event_reasons = SW_POWER_CAP  # ordinary at full load
    assert health(await monitor.poll_once(), 0) is GpuHealth.HEALTHY

    backend.gpus[0].clocks_event_reasons = SW_POWER_CAP | HW_THERMAL
    snapshot = await monitor.poll_once()
    assert health(snapshot, 0) is GpuHealth.DEGRADED
    assert reason_codes(snapshot, 0) == ["throttle_hw_thermal_slowdown"]
    assert snapshot.gpus[0].readings.clocks_event_reason_names == ["sw_power_cap", "hw_thermal_slowdown"]

    backend.gpus[0].clocks_event_reasons = 0
    assert health(await monitor.poll_once(), 0) is GpuHealth.HEALTHY
    assert [c.current for c in changes] == [GpuHealth.DEGRADED, GpuHealth.HEALTHY]
    await monitor.stop()


async def test_temperature_at_slowdown_threshold_degrades() -> None:
    backend = FakeNvmlBackend.with_gpus(1)
    monitor = make_monitor(backend)
    backend.gpus[0].temperature_c = 87
    snapshot = await monitor.poll_once()
    assert health(snapshot, 0) is GpuHealth.DEGRADED
    assert reason_codes(snapshot, 0) == ["temperature_at_slowdown"]

    backend.gpus[0].temperature_c = 80
    assert health(await monitor.poll_once(), 0) is GpuHealth.HEALTHY
    await monitor.stop()


async def test_remapped_rows_pending_degrades_and_failure_fails() -> None:
    backend = FakeNvmlBackend.with_gpus(2)
    monitor = make_monitor(backend)
    backend.gpus[0].remapped_rows = RemappedRows(correctable=0, uncorrectable=1, pending=True, failure=False)
    backend.gpus[1].remapped_rows = RemappedRows(correctable=0, uncorrectable=9, pending=False, failure=True)

    snapshot = await monitor.poll_once()

    assert health(snapshot, 0) is GpuHealth.DEGRADED
    assert reason_codes(snapshot, 0) == ["remapped_rows_pending"]
    assert health(snapshot, 1) is GpuHealth.FAILED
    assert reason_codes(snapshot, 1) == ["remapped_rows_failure"]
    await monitor.stop()


async def test_lost_gpu_fails_and_is_no_longer_polled() -> None:
    backend = FakeNvmlBackend.with_gpus(2)
    monitor = make_monitor(backend)
    changes: list[GpuHealthChange] = []
    monitor.subscribe(changes.append)
    await monitor.poll_once()

    backend.gpus[0].lost = True
    snapshot = await monitor.poll_once()

    assert health(snapshot, 0) is GpuHealth.FAILED
    assert reason_codes(snapshot, 0) == ["gpu_lost"]
    assert health(snapshot, 1) is GpuHealth.HEALTHY
    assert [(c.index, c.current) for c in changes] == [(0, GpuHealth.FAILED)]
    # Last good readings stay visible; their age keeps growing.
    assert snapshot.gpus[0].readings.temperature_c == 40

    backend.gpus[0].lost = False
    assert health(await monitor.poll_once(), 0) is GpuHealth.FAILED
    await monitor.stop()


async def test_reset_required_at_start_fails_that_gpu() -> None:
    backend = FakeNvmlBackend.with_gpus(2)
    backend.gpus[1].reset_required = True
    monitor = make_monitor(backend)

    snapshot = await monitor.poll_once()

    assert health(snapshot, 1) is GpuHealth.FAILED
    assert reason_codes(snapshot, 1) == ["gpu_reset_required"]
    assert health(snapshot, 0) is GpuHealth.HEALTHY
    await monitor.stop()


async def test_unsupported_readings_are_absent_not_errors() -> None:
    backend = FakeNvmlBackend.with_gpus(1)
    backend.gpus[0].remapped_rows = None
    backend.gpus[0].pcie_replay_counter = None
    backend.gpus[0].slowdown_temperature_c = None
    monitor = make_monitor(backend)

    gpu = (await monitor.poll_once()).gpus[0]

    assert gpu.health is GpuHealth.HEALTHY
    assert gpu.readings.remapped_rows is None
    assert gpu.readings.pcie_replay_count is None
    assert gpu.readings.temperature_slowdown_c is None
    assert gpu.readings.temperature_c == 40
    await monitor.stop()


async def test_age_reports_staleness() -> None:
    backend = FakeNvmlBackend.with_gpus(1)
    clock = ManualClock()
    monitor = make_monitor(backend, clock)
    assert (await monitor.poll_once()).gpus[0].age_s == 0

    clock.now += 7
    assert monitor.snapshot().gpus[0].age_s == 7
    await monitor.stop()


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
async def test_missing_nvml_is_a_state_not_a_crash(code: int) -> None:
    backend = FakeNvmlBackend(init_error=code)
    monitor = make_monitor(backend)

    await monitor.start()
    snapshot = monitor.snapshot()
    await monitor.stop()

    assert snapshot.nvml_state == "nvml_unavailable"
    assert not snapshot.nvml_available
    assert snapshot.nvml_reason is not None and type(pynvml.NVMLError(code)).__name__ in snapshot.nvml_reason
    assert snapshot.gpus == []
    assert backend.shutdown_calls == 0


async def test_nvml_calls_never_run_on_the_event_loop_thread() -> None:
    backend = FakeNvmlBackend.with_gpus(2)
    monitor = make_monitor(backend)
    await monitor.poll_once()
    backend.inject_xid(0, 13)
    await monitor.drain_events()
    monitor.snapshot()
    await monitor.stop()

    assert backend.call_threads  # the fake did record its calls
    assert threading.get_ident() not in backend.call_threads


async def test_ecc_events_are_recorded_and_double_bit_degrades() -> None:
    backend = FakeNvmlBackend.with_gpus(2)
    monitor = make_monitor(backend)
    await monitor.poll_once()

    backend.inject_ecc(0, double_bit=False)
    backend.inject_ecc(1, double_bit=True)
    assert await monitor.drain_events() == 2
    snapshot = monitor.snapshot()

    assert health(snapshot, 0) is GpuHealth.HEALTHY
    assert [event.kind for event in snapshot.gpus[0].recent_events] == ["ecc_single_bit"]
    assert health(snapshot, 1) is GpuHealth.DEGRADED
    assert reason_codes(snapshot, 1) == ["ecc_double_bit_event"]
    await monitor.stop()
