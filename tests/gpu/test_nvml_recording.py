"""Recorded NVML answers replayed: the fake's round trip, and what a real H100 answered the probe."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.worker_process import eventually
from worker.gpu import FakeNvmlBackend, GpuHealth, GpuMetricsCollector, GpuMonitor
from worker.gpu.probe import main as probe_main
from worker.gpu.probe import probe
from worker.gpu.recording import RecordingBackend, ReplayNvmlBackend

DATA = Path(__file__).parent / "data"
# Fields that say when, not what: they differ between any two runs.
TIMING_FIELDS = frozenset({"taken_at", "age_s", "since", "at"})


def without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: without_timing(item) for key, item in value.items() if key not in TIMING_FIELDS}
    if isinstance(value, list):
        return [without_timing(item) for item in value]
    return value


async def record_probe(backend: FakeNvmlBackend, listen_s: float, tmp_path: Path) -> tuple[dict[str, Any], Path]:
    recorder = RecordingBackend(backend)
    document = await probe(listen_s, recorder)
    path = tmp_path / "recording.json"
    recorder.save(path, host="test")
    return document, path


async def test_replay_gives_the_probe_what_the_recorded_backend_gave(tmp_path: Path) -> None:
    backend = FakeNvmlBackend.with_gpus(2)
    backend.gpus[0].pcie_replay_counter = None  # refused: NVMLError_NotSupported
    backend.gpus[1].clocks_event_reasons = pynvml.nvmlClocksEventReasonHwThermalSlowdown

    async def listening() -> bool:
        return backend.is_listening(1)

    async def xid_during_listening() -> None:
        assert await eventually(listening, timeout_s=10)
        backend.inject_xid(1, 79)

    injector = asyncio.create_task(xid_during_listening())
    live, path = await record_probe(backend, 1.0, tmp_path)
    await injector

    replayed = await probe(1.0, ReplayNvmlBackend.load(path))

    assert without_timing(replayed) == without_timing(live)
    # The replay kept the order of things: healthy (only throttled) first, failed after the XID.
    assert replayed["first_snapshot"]["gpus"][1]["health"] == "degraded"
    assert replayed["last_snapshot"]["gpus"][1]["health"] == "failed"
    assert replayed["last_snapshot"]["gpus"][1]["xid_last"] == 79
    assert replayed["last_snapshot"]["gpus"][0]["readings"]["pcie_replay_count"] is None
    assert [change["current"] for change in replayed["health_changes"]] == ["degraded", "failed"]


async def test_replay_of_a_node_without_nvml(tmp_path: Path) -> None:
    live, path = await record_probe(
        FakeNvmlBackend(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED), 0, tmp_path
    )
    calls = json.loads(path.read_text())["calls"]

    replayed = await probe(0, ReplayNvmlBackend.load(path))

    assert {call["error_name"] for call in calls} == {"NVMLError_DriverNotLoaded"}
    assert without_timing(replayed) == without_timing(live)
    assert not replayed["inventory"]["nvml_available"]


def test_replay_refuses_a_call_it_never_recorded() -> None:
    backend = ReplayNvmlBackend([{"method": "device_count", "args": [], "result": 1, "at_s": 0.0}])

    assert backend.device_count() == 1
    assert backend.device_count() == 1  # the last answer repeats
    with pytest.raises(pynvml.NVMLError_NotSupported):
        backend.temperature_c(0)
    with pytest.raises(AttributeError):
        backend.not_an_nvml_call  # noqa: B018


def test_probe_command_writes_its_recording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeNvmlBackend.with_gpus(1)
    monkeypatch.setattr("worker.gpu.probe.PynvmlBackend", lambda: fake)
    path = tmp_path / "nvml.json"

    assert probe_main(["--listen-s", "0", "--record", str(path)]) == 0

    document = json.loads(capsys.readouterr().out)
    recording = json.loads(path.read_text())
    assert document["inventory"]["gpus"][0]["uuid"] == fake.gpus[0].uuid
    assert recording["listen_s"] == 0
    assert {"init", "uuid", "memory_info", "register_events"} <= {call["method"] for call in recording["calls"]}


# What one NVIDIA H100 80GB HBM3 (driver 580.159.04, passed through to a Firecracker VM) answered
# `python -m worker.gpu.probe --listen-s 14 --record ...`: idle at the first poll, running bf16 matrix
# products at the second. tests/gpu/data/h100-probe.json is what the probe printed there.
H100_RECORDING = DATA / "h100-nvml-recording.json"
H100_PROBE = json.loads((DATA / "h100-probe.json").read_text())


async def test_monitor_reads_the_recorded_h100_as_it_did_live() -> None:
    # No event came in the 14 s listened there, so the replay need not wait them out.
    replayed = await probe(0, ReplayNvmlBackend.load(H100_RECORDING))

    assert without_timing(replayed) == without_timing({**H100_PROBE, "listened_s": 0})


async def test_recorded_h100_readings_idle_and_under_load() -> None:
    replayed = await probe(0, ReplayNvmlBackend.load(H100_RECORDING))
    idle, loaded = replayed["first_snapshot"]["gpus"][0], replayed["last_snapshot"]["gpus"][0]

    assert replayed["inventory"]["driver_version"] == "580.159.04"
    assert idle["name"] == "NVIDIA H100 80GB HBM3"
    for gpu in (idle, loaded):
        # A power-capped GPU at full load is working as intended, not degraded.
        assert gpu["health"] == "healthy" and gpu["reasons"] == []
        assert gpu["readings"]["remapped_rows"] == {"correctable": 0, "uncorrectable": 0, "pending": False,
                                                    "failure": False}
        assert gpu["readings"]["ecc_uncorrected_volatile"] == 0
        # nvidia-smi said 480 MiB reserved at both moments.
        assert gpu["readings"]["memory_reserved_bytes"] == 480 * 1024**2
    assert idle["readings"]["clocks_event_reason_names"] == ["gpu_idle"]
    assert loaded["readings"]["clocks_event_reason_names"] == ["sw_power_cap"]
    # nvidia-smi: 0 MiB used idle, 1011 MiB under load (version 1 of NVML's call said 480 and 1491).
    assert idle["readings"]["memory_used_bytes"] == 0
    assert round(loaded["readings"]["memory_used_bytes"] / 1024**2) == 1011
    assert loaded["readings"]["utilization_gpu_ratio"] >= 0.9
    assert loaded["readings"]["power_w"] > 0.9 * loaded["readings"]["power_limit_w"]


async def test_monitor_registers_xid_and_ecc_events_on_the_recorded_h100() -> None:
    # What the monitor asks of the H100's answers (its supported event mask), seen through a recorder.
    seen = RecordingBackend(ReplayNvmlBackend.load(H100_RECORDING))
    await probe(0, seen)

    registrations = [call for call in seen.calls if call["method"] == "register_events"]
    wanted = (pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeDoubleBitEccError
              | pynvml.nvmlEventTypeSingleBitEccError)
    assert [call["args"][:2] for call in registrations] == [[0, wanted]]
    assert "nvml_error" not in registrations[0]


async def test_recorded_h100_on_the_metrics_page() -> None:
    monitor = GpuMonitor(ReplayNvmlBackend.load(H100_RECORDING))
    registry = CollectorRegistry()
    registry.register(GpuMetricsCollector(monitor))
    await monitor.start()
    try:
        families = {family.name: family for family in text_string_to_metric_families(
            generate_latest(registry).decode())}
    finally:
        await monitor.stop()

    uuid = H100_PROBE["inventory"]["gpus"][0]["uuid"]
    labels = {"gpu": "0", "uuid": uuid}
    health = families["worker_gpu_health"].samples
    assert [(sample.labels, sample.value) for sample in health] == [(labels, GpuHealth.HEALTHY.severity)]
    assert families["worker_gpu_temperature_celsius"].samples[0].value == 46
    assert families["worker_gpu_memory_reserved_bytes"].samples[0].value == 480 * 1024**2
    assert families["worker_gpu_nvml_available"].samples[0].value == 1
