"""The few NVML calls the GPU monitor needs, behind an interface a test double can implement.

Implementations raise `pynvml.NVMLError` subclasses exactly as NVML would (`NVMLError_NotSupported`,
`NVMLError_GpuIsLost`, ...), so the monitor's error handling is the same for the real library and
the fake. GPUs are addressed by NVML index; the implementation keeps its own handles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import pynvml

# Event types the monitor listens for (pynvml.nvmlEventType*).
EVENT_SINGLE_BIT_ECC = pynvml.nvmlEventTypeSingleBitEccError
EVENT_DOUBLE_BIT_ECC = pynvml.nvmlEventTypeDoubleBitEccError
EVENT_XID_CRITICAL = pynvml.nvmlEventTypeXidCriticalError
MONITORED_EVENTS = EVENT_XID_CRITICAL | EVENT_DOUBLE_BIT_ECC | EVENT_SINGLE_BIT_ECC

# NVML errors that mean the GPU itself is gone until a reset: fatal for the device.
GPU_LOST_ERRORS: tuple[type[pynvml.NVMLError], ...] = (
    pynvml.NVMLError_GpuIsLost,
    pynvml.NVMLError_ResetRequired,
)
# NVML errors that mean "this reading does not exist on this device": the reading is just absent.
READING_ABSENT_ERRORS: tuple[type[pynvml.NVMLError], ...] = (
    pynvml.NVMLError_NotSupported,
    pynvml.NVMLError_FunctionNotFound,
    pynvml.NVMLError_NoPermission,
    pynvml.NVMLError_NoData,
)


@dataclass(frozen=True)
class MemoryInfo:
    total_bytes: int
    # What processes hold, as nvidia-smi's "Used": without the driver's reserved memory.
    used_bytes: int
    free_bytes: int
    # Held by the driver and firmware; None where the driver has only NVML's version 1 call.
    reserved_bytes: int | None = None


@dataclass(frozen=True)
class UtilizationRates:
    gpu_percent: int
    memory_percent: int


@dataclass(frozen=True)
class RemappedRows:
    correctable: int
    uncorrectable: int
    pending: bool
    failure: bool


@dataclass(frozen=True)
class NvmlEvent:
    """One event from an NVML event set; `gpu_index` is None when the device could not be identified."""

    gpu_index: int | None
    event_type: int
    # The XID number for XidCriticalError events; 0 otherwise.
    event_data: int


@runtime_checkable
class NvmlBackend(Protocol):
    def init(self) -> None:
        """Load and initialise NVML; raises NVMLError_LibraryNotFound / DriverNotLoaded without a driver."""

    def shutdown(self) -> None: ...

    def driver_version(self) -> str: ...

    def device_count(self) -> int: ...

    def uuid(self, index: int) -> str: ...

    def name(self, index: int) -> str: ...

    def memory_info(self, index: int) -> MemoryInfo: ...

    def temperature_c(self, index: int) -> int: ...

    def slowdown_temperature_c(self, index: int) -> int: ...

    def shutdown_temperature_c(self, index: int) -> int: ...

    def power_usage_mw(self, index: int) -> int: ...

    def enforced_power_limit_mw(self, index: int) -> int: ...

    def utilization(self, index: int) -> UtilizationRates: ...

    def clocks_event_reasons(self, index: int) -> int: ...

    def ecc_uncorrected_volatile(self, index: int) -> int: ...

    def remapped_rows(self, index: int) -> RemappedRows: ...

    def pcie_replay_counter(self, index: int) -> int: ...

    def supported_event_types(self, index: int) -> int: ...

    def create_event_set(self) -> object: ...

    def register_events(self, index: int, event_types: int, event_set: object) -> None: ...

    def wait_event(self, event_set: object, timeout_ms: int) -> NvmlEvent | None:
        """Block up to `timeout_ms` for the next event; None when nothing happened (NVML's TIMEOUT)."""

    def free_event_set(self, event_set: object) -> None: ...
