"""Turning NVML readings and events into a per-GPU health verdict.

Three kinds of reasons:
- sticky: failed until the process restarts (fatal XID, GPU lost, row-remap failure, ECC burst);
- held: degraded for `degraded_hold_s` after the last occurrence (XID warnings, ECC increase), because
  the event itself never "clears";
- live: degraded while the latest readings show the condition (throttling, heat, pending remap).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import StrEnum

import pynvml
from pydantic import BaseModel, ConfigDict, Field

from worker.gpu.models import (
    GpuEventRecord,
    GpuHealth,
    GpuHealthChange,
    GpuReadings,
    GpuStatus,
    HealthReason,
)


class XidClass(StrEnum):
    FATAL = "fatal"  # GPU needs a reset or the node a restart
    APPLICATION_RESTART = "application_restart"  # contained error: restart what ran on it
    WARNING = "warning"
    APPLICATION_FAULT = "application_fault"  # the program's fault, not the GPU's
    UNKNOWN = "unknown"


FATAL_XIDS = frozenset({46, 48, 62, 64, 74, 79, 95, 110, 119, 120, 136, 140, 143, 155, 156, 157, 158})
APPLICATION_RESTART_XIDS = frozenset({94})
WARNING_XIDS = frozenset({63, 92})
APPLICATION_FAULT_XIDS = frozenset({13, 31, 43, 45, 68})


def classify_xid(xid: int) -> XidClass:
    if xid in FATAL_XIDS:
        return XidClass.FATAL
    if xid in APPLICATION_RESTART_XIDS:
        return XidClass.APPLICATION_RESTART
    if xid in WARNING_XIDS:
        return XidClass.WARNING
    if xid in APPLICATION_FAULT_XIDS:
        return XidClass.APPLICATION_FAULT
    return XidClass.UNKNOWN


CLOCKS_EVENT_REASON_NAMES: dict[int, str] = {
    pynvml.nvmlClocksEventReasonGpuIdle: "gpu_idle",
    pynvml.nvmlClocksEventReasonApplicationsClocksSetting: "applications_clocks_setting",
    pynvml.nvmlClocksEventReasonSwPowerCap: "sw_power_cap",
    pynvml.nvmlClocksEventReasonHwSlowdown: "hw_slowdown",
    pynvml.nvmlClocksEventReasonSyncBoost: "sync_boost",
    pynvml.nvmlClocksEventReasonSwThermalSlowdown: "sw_thermal_slowdown",
    pynvml.nvmlClocksEventReasonHwThermalSlowdown: "hw_thermal_slowdown",
    pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown: "hw_power_brake_slowdown",
    pynvml.nvmlClocksEventReasonDisplayClockSetting: "display_clock_setting",
}
# SwPowerCap is ordinary under full load; these mean the GPU is being held back by heat or power faults.
DEGRADING_CLOCKS_EVENT_REASONS = (
    pynvml.nvmlClocksEventReasonHwSlowdown
    | pynvml.nvmlClocksEventReasonSwThermalSlowdown
    | pynvml.nvmlClocksEventReasonHwThermalSlowdown
    | pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown
)


def clocks_event_reason_names(bits: int) -> list[str]:
    return [name for bit, name in CLOCKS_EVENT_REASON_NAMES.items() if bits & bit]


class GpuHealthPolicy(BaseModel):
    model_config = ConfigDict(frozen=True)

    ecc_burst_threshold: int = Field(
        default=10, ge=1, description="new volatile uncorrected ECC errors between two polls that fail a GPU"
    )
    degraded_hold_s: float = Field(
        default=600.0, gt=0, description="how long a XID warning or an ECC increase keeps a GPU degraded"
    )
    recent_events_kept: int = Field(default=16, ge=0)


class GpuHealthTracker:
    """Health bookkeeping for one GPU. Not thread-safe: the monitor serialises access."""

    def __init__(
        self,
        index: int,
        uuid: str,
        name: str,
        policy: GpuHealthPolicy,
        *,
        wall_clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self.index = index
        self.uuid = uuid
        self.name = name
        self.lost = False
        self._policy = policy
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        self._sticky: dict[str, HealthReason] = {}
        self._held: dict[str, tuple[HealthReason, float]] = {}  # code -> (reason, expires at, monotonic)
        self._live: dict[str, HealthReason] = {}
        self._readings = GpuReadings()
        self._last_poll: float | None = None
        self._ecc_baseline: int | None = None
        self._xid_last: int | None = None
        self._xid_count = 0
        self._application_fault_xids = 0
        self._recent_events: deque[GpuEventRecord] = deque(maxlen=policy.recent_events_kept)
        self._reported_health = GpuHealth.HEALTHY

    # Inputs ------------------------------------------------------------------------------------

    def record_readings(self, readings: GpuReadings) -> None:
        self._readings = readings
        self._last_poll = self._monotonic()
        self._record_ecc(readings.ecc_uncorrected_volatile)
        live: list[tuple[str, str]] = []
        bits = readings.clocks_event_reasons or 0
        for bit, name in CLOCKS_EVENT_REASON_NAMES.items():
            if bits & bit & DEGRADING_CLOCKS_EVENT_REASONS:
                live.append((f"throttle_{name}", f"clocks held back: {name} (0x{bit:x})"))
        if (
            readings.temperature_c is not None
            and readings.temperature_slowdown_c is not None
            and readings.temperature_c >= readings.temperature_slowdown_c
        ):
            live.append(
                (
                    "temperature_at_slowdown",
                    f"{readings.temperature_c} C >= slowdown threshold {readings.temperature_slowdown_c} C",
                )
            )
        rows = readings.remapped_rows
        if rows is not None and rows.failure:
            self._fail("remapped_rows_failure", "row remapping failed: the GPU needs replacing")
        if rows is not None and rows.pending:
            live.append(("remapped_rows_pending", "a row remap is pending: the GPU needs a reset"))
        now = self._wall_clock()
        self._live = {
            code: self._live.get(code)
            or HealthReason(code=code, health=GpuHealth.DEGRADED, message=message, since=now)
            for code, message in live
        }

    def _record_ecc(self, count: int | None) -> None:
        if count is None:
            return
        baseline, self._ecc_baseline = self._ecc_baseline, count
        # The first reading, or a counter reset by a driver reload, only sets the baseline.
        if baseline is None or count <= baseline:
            return
        increase = count - baseline
        if increase >= self._policy.ecc_burst_threshold:
            self._fail("ecc_uncorrected_burst", f"{increase} new volatile uncorrected ECC errors in one poll")
        else:
            self._hold("ecc_uncorrected_increase", f"{increase} new volatile uncorrected ECC error(s)")

    def record_lost(self, error: pynvml.NVMLError) -> None:
        self.lost = True
        code = "gpu_reset_required" if isinstance(error, pynvml.NVMLError_ResetRequired) else "gpu_lost"
        self._fail(code, f"NVML: {error}")

    def record_xid(self, xid: int) -> XidClass:
        xid_class = classify_xid(xid)
        self._xid_last = xid
        self._xid_count += 1
        self._recent_events.append(
            GpuEventRecord(at=self._wall_clock(), kind="xid", xid=xid, xid_class=xid_class.value)
        )
        if xid_class is XidClass.FATAL:
            self._fail(f"xid_{xid}", f"fatal XID {xid}: the GPU needs a reset")
        elif xid_class is XidClass.APPLICATION_FAULT:
            self._application_fault_xids += 1
        else:
            self._hold(f"xid_{xid}", f"XID {xid} ({xid_class.value})")
        return xid_class

    def record_ecc_event(self, *, double_bit: bool) -> None:
        self._recent_events.append(
            GpuEventRecord(at=self._wall_clock(), kind="ecc_double_bit" if double_bit else "ecc_single_bit")
        )
        # Whether a double-bit error is fatal shows in the XID that accompanies it (48/95 vs 94).
        if double_bit:
            self._hold("ecc_double_bit_event", "double-bit ECC error event")

    def _fail(self, code: str, message: str) -> None:
        if code not in self._sticky:
            self._sticky[code] = HealthReason(
                code=code, health=GpuHealth.FAILED, message=message, since=self._wall_clock()
            )

    def _hold(self, code: str, message: str) -> None:
        expires = self._monotonic() + self._policy.degraded_hold_s
        previous = self._held.get(code)
        since = previous[0].since if previous else self._wall_clock()
        reason = HealthReason(code=code, health=GpuHealth.DEGRADED, message=message, since=since)
        self._held[code] = (reason, expires)

    # Outputs -----------------------------------------------------------------------------------

    def reasons(self) -> list[HealthReason]:
        now = self._monotonic()
        self._held = {code: entry for code, entry in self._held.items() if entry[1] > now}
        held = [reason for reason, _ in self._held.values()]
        return [*self._sticky.values(), *held, *self._live.values()]

    def health(self) -> GpuHealth:
        reasons = self.reasons()
        if any(reason.health is GpuHealth.FAILED for reason in reasons):
            return GpuHealth.FAILED
        return GpuHealth.DEGRADED if reasons else GpuHealth.HEALTHY

    def take_change(self) -> GpuHealthChange | None:
        """The health change since the last call, if any (each change is reported once)."""
        current = self.health()
        if current is self._reported_health:
            return None
        change = GpuHealthChange(
            index=self.index,
            uuid=self.uuid,
            previous=self._reported_health,
            current=current,
            reasons=self.reasons(),
        )
        self._reported_health = current
        return change

    def status(self) -> GpuStatus:
        age = None if self._last_poll is None else max(0.0, self._monotonic() - self._last_poll)
        return GpuStatus(
            index=self.index,
            uuid=self.uuid,
            name=self.name,
            health=self.health(),
            reasons=self.reasons(),
            readings=self._readings,
            xid_last=self._xid_last,
            xid_count=self._xid_count,
            application_fault_xid_count=self._application_fault_xids,
            recent_events=list(self._recent_events),
            age_s=age,
        )
