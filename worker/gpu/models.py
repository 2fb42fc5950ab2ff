"""Wire shapes of the GPU monitor: inventory, readings, health, fleet snapshot (all JSON-serialisable)."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GpuHealth(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    FAILED = "failed"

    @property
    def severity(self) -> int:
        """0 healthy, 1 degraded, 2 failed (also the value of the health gauge)."""
        return _SEVERITY[self]


_SEVERITY = {GpuHealth.HEALTHY: 0, GpuHealth.DEGRADED: 1, GpuHealth.FAILED: 2}

NvmlState = Literal["not_started", "available", "nvml_unavailable"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class GpuInfo(_Frozen):
    index: int
    uuid: str
    name: str
    memory_total_bytes: int | None = None


class GpuInventory(_Frozen):
    """What start-up needs: which GPUs exist. Empty, with a reason, when NVML is unavailable."""

    nvml_available: bool
    reason: str | None = None
    driver_version: str | None = None
    gpus: list[GpuInfo] = Field(default_factory=list)
    # GPUs NVML counts but could not describe (lost, reset required, ...): index -> error.
    unreadable: dict[int, str] = Field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.gpus)


class RemappedRowsReading(_Frozen):
    correctable: int
    uncorrectable: int
    pending: bool
    failure: bool


class GpuReadings(_Frozen):
    """One poll of one GPU. A field is None when the device does not support (or refused) that reading."""

    temperature_c: int | None = None
    temperature_slowdown_c: int | None = None
    temperature_shutdown_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    memory_used_bytes: int | None = None  # held by processes (nvidia-smi's "Used")
    memory_reserved_bytes: int | None = None  # held by the driver; None where NVML cannot tell
    memory_total_bytes: int | None = None
    utilization_gpu_ratio: float | None = None
    utilization_memory_ratio: float | None = None
    clocks_event_reasons: int | None = None
    clocks_event_reason_names: list[str] = Field(default_factory=list)
    ecc_uncorrected_volatile: int | None = None
    remapped_rows: RemappedRowsReading | None = None
    pcie_replay_count: int | None = None


class HealthReason(_Frozen):
    code: str  # e.g. "xid_79", "gpu_lost", "thermal_throttle", "remapped_rows_pending"
    health: GpuHealth  # what this reason alone makes the GPU
    message: str
    since: float  # unix time the reason was first seen


class GpuEventRecord(_Frozen):
    at: float  # unix time
    kind: Literal["xid", "ecc_single_bit", "ecc_double_bit"]
    xid: int | None = None
    xid_class: str | None = None  # fatal | application_restart | warning | application_fault | unknown


class GpuStatus(_Frozen):
    index: int
    uuid: str
    name: str
    health: GpuHealth
    reasons: list[HealthReason] = Field(default_factory=list)
    readings: GpuReadings = Field(default_factory=GpuReadings)
    xid_last: int | None = None
    xid_count: int = 0
    application_fault_xid_count: int = 0
    recent_events: list[GpuEventRecord] = Field(default_factory=list)
    # Seconds since the last successful poll of this GPU; None before the first one.
    age_s: float | None = None


class GpuHealthChange(_Frozen):
    """Sent to subscribers when a GPU's health changes."""

    index: int
    uuid: str
    previous: GpuHealth
    current: GpuHealth
    reasons: list[HealthReason]


class GpuFleetSnapshot(_Frozen):
    nvml_state: NvmlState
    nvml_reason: str | None = None
    driver_version: str | None = None
    taken_at: float  # unix time
    gpus: list[GpuStatus] = Field(default_factory=list)

    @property
    def nvml_available(self) -> bool:
        return self.nvml_state == "available"

    def failed_indices(self) -> list[int]:
        return [gpu.index for gpu in self.gpus if gpu.health is GpuHealth.FAILED]

    def gpu(self, index: int) -> GpuStatus | None:
        return next((gpu for gpu in self.gpus if gpu.index == index), None)
