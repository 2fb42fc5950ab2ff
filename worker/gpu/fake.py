"""A scriptable `NvmlBackend` for tests and CPU-only development.

Each `FakeGpu` field is a reading; None makes that call raise NVMLError_NotSupported. Setting
`lost` makes every call on the GPU raise NVMLError_GpuIsLost. Events injected with `inject_xid` /
`inject_ecc` reach event sets the GPU was registered into, as NVML would deliver them.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import TypeVar

import pynvml

from worker.gpu.backend import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID_CRITICAL,
    MONITORED_EVENTS,
    MemoryInfo,
    NvmlEvent,
    RemappedRows,
    UtilizationRates,
)

GIB = 1024**3

_T = TypeVar("_T")


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    memory_total_bytes: int | None = 80 * GIB
    memory_used_bytes: int | None = 1 * GIB
    memory_reserved_bytes: int | None = None
    temperature_c: int | None = 40
    slowdown_temperature_c: int | None = 87
    shutdown_temperature_c: int | None = 92
    power_usage_mw: int | None = 70_000
    enforced_power_limit_mw: int | None = 700_000
    utilization_gpu_percent: int | None = 0
    utilization_memory_percent: int | None = 0
    clocks_event_reasons: int | None = 0
    ecc_uncorrected_volatile: int | None = 0
    remapped_rows: RemappedRows | None = field(
        default_factory=lambda: RemappedRows(correctable=0, uncorrectable=0, pending=False, failure=False)
    )
    pcie_replay_counter: int | None = 0
    supported_event_types: int = MONITORED_EVENTS
    lost: bool = False
    reset_required: bool = False


class _FakeEventSet:
    def __init__(self) -> None:
        self.events: queue.Queue[NvmlEvent] = queue.Queue()
        self.registered: dict[int, int] = {}  # gpu index -> event type mask


class FakeNvmlBackend:
    def __init__(self, gpus: list[FakeGpu] | None = None, *, init_error: int | None = None) -> None:
        """`init_error` is an NVML_ERROR_* code that `init()` raises (e.g. NVML_ERROR_LIBRARY_NOT_FOUND)."""
        self.gpus: list[FakeGpu] = list(gpus or [])
        self.init_error = init_error
        self.driver = "580.95.05"
        self.initialised = False
        self.init_calls = 0
        self.shutdown_calls = 0
        # Thread idents of every NVML call, so tests can prove nothing ran on the event loop.
        self.call_threads: set[int] = set()
        self._event_sets: list[_FakeEventSet] = []
        self._lock = threading.Lock()

    @classmethod
    def with_gpus(cls, count: int) -> FakeNvmlBackend:
        return cls([FakeGpu(uuid=f"GPU-00000000-0000-0000-0000-00000000000{i}") for i in range(count)])

    # Scripting helpers -------------------------------------------------------------------------

    def inject_xid(self, index: int, xid: int) -> None:
        self._deliver(NvmlEvent(gpu_index=index, event_type=EVENT_XID_CRITICAL, event_data=xid))

    def inject_ecc(self, index: int, *, double_bit: bool) -> None:
        event_type = EVENT_DOUBLE_BIT_ECC if double_bit else EVENT_SINGLE_BIT_ECC
        self._deliver(NvmlEvent(gpu_index=index, event_type=event_type, event_data=0))

    def is_listening(self, index: int, event_type: int = EVENT_XID_CRITICAL) -> bool:
        """Whether an event set is registered for this GPU's events of this type: an injected one reaches it."""
        with self._lock:
            return any(event_set.registered.get(index, 0) & event_type for event_set in self._event_sets)

    def _deliver(self, event: NvmlEvent) -> None:
        with self._lock:
            for event_set in self._event_sets:
                mask = event_set.registered.get(event.gpu_index, 0) if event.gpu_index is not None else 0
                if mask & event.event_type:
                    event_set.events.put(event)

    # NvmlBackend -------------------------------------------------------------------------------

    def _enter(self) -> None:
        self.call_threads.add(threading.get_ident())
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, index: int) -> FakeGpu:
        self._enter()
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[index]
        if gpu.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if gpu.reset_required:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_RESET_REQUIRED)
        return gpu

    @staticmethod
    def _supported(value: _T | None) -> _T:
        if value is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def init(self) -> None:
        self.call_threads.add(threading.get_ident())
        self.init_calls += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised = True

    def shutdown(self) -> None:
        self._enter()
        self.shutdown_calls += 1
        self.initialised = False

    def driver_version(self) -> str:
        self._enter()
        return self.driver

    def device_count(self) -> int:
        self._enter()
        return len(self.gpus)

    def uuid(self, index: int) -> str:
        return self._gpu(index).uuid

    def name(self, index: int) -> str:
        return self._gpu(index).name

    def memory_info(self, index: int) -> MemoryInfo:
        gpu = self._gpu(index)
        total = self._supported(gpu.memory_total_bytes)
        used = self._supported(gpu.memory_used_bytes)
        reserved = gpu.memory_reserved_bytes
        return MemoryInfo(total_bytes=total, used_bytes=used, free_bytes=total - used - (reserved or 0),
                          reserved_bytes=reserved)

    def temperature_c(self, index: int) -> int:
        return self._supported(self._gpu(index).temperature_c)

    def slowdown_temperature_c(self, index: int) -> int:
        return self._supported(self._gpu(index).slowdown_temperature_c)

    def shutdown_temperature_c(self, index: int) -> int:
        return self._supported(self._gpu(index).shutdown_temperature_c)

    def power_usage_mw(self, index: int) -> int:
        return self._supported(self._gpu(index).power_usage_mw)

    def enforced_power_limit_mw(self, index: int) -> int:
        return self._supported(self._gpu(index).enforced_power_limit_mw)

    def utilization(self, index: int) -> UtilizationRates:
        gpu = self._gpu(index)
        return UtilizationRates(
            gpu_percent=self._supported(gpu.utilization_gpu_percent),
            memory_percent=self._supported(gpu.utilization_memory_percent),
        )

    def clocks_event_reasons(self, index: int) -> int:
        return self._supported(self._gpu(index).clocks_event_reasons)

    def ecc_uncorrected_volatile(self, index: int) -> int:
        return self._supported(self._gpu(index).ecc_uncorrected_volatile)

    def remapped_rows(self, index: int) -> RemappedRows:
        return self._supported(self._gpu(index).remapped_rows)

    def pcie_replay_counter(self, index: int) -> int:
        return self._supported(self._gpu(index).pcie_replay_counter)

    def supported_event_types(self, index: int) -> int:
        return self._gpu(index).supported_event_types

    def create_event_set(self) -> object:
        self._enter()
        event_set = _FakeEventSet()
        with self._lock:
            self._event_sets.append(event_set)
        return event_set

    def register_events(self, index: int, event_types: int, event_set: object) -> None:
        gpu = self._gpu(index)
        if event_types & ~gpu.supported_event_types:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        assert isinstance(event_set, _FakeEventSet)
        with self._lock:
            event_set.registered[index] = event_set.registered.get(index, 0) | event_types

    def wait_event(self, event_set: object, timeout_ms: int) -> NvmlEvent | None:
        self._enter()
        assert isinstance(event_set, _FakeEventSet)
        try:
            if timeout_ms <= 0:
                return event_set.events.get_nowait()
            return event_set.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            return None

    def free_event_set(self, event_set: object) -> None:
        self._enter()
        with self._lock:
            self._event_sets = [s for s in self._event_sets if s is not event_set]
