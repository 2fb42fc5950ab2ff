"""`NvmlBackend` over the real NVML library (nvidia-ml-py). Thin: one NVML call per method."""

from __future__ import annotations

import threading

import pynvml

from worker.gpu.backend import MemoryInfo, NvmlEvent, RemappedRows, UtilizationRates


class PynvmlBackend:
    def __init__(self) -> None:
        self._handles: dict[int, object] = {}
        self._memory_v2 = True
        # The poll thread and the event thread both look handles up.
        self._handles_lock = threading.Lock()

    def init(self) -> None:
        pynvml.nvmlInit()

    def shutdown(self) -> None:
        with self._handles_lock:
            self._handles.clear()
        pynvml.nvmlShutdown()

    def _handle(self, index: int) -> object:
        with self._handles_lock:
            handle = self._handles.get(index)
            if handle is None:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self._handles[index] = handle
            return handle

    def driver_version(self) -> str:
        return str(pynvml.nvmlSystemGetDriverVersion())

    def device_count(self) -> int:
        return int(pynvml.nvmlDeviceGetCount())

    def uuid(self, index: int) -> str:
        return str(pynvml.nvmlDeviceGetUUID(self._handle(index)))

    def name(self, index: int) -> str:
        return str(pynvml.nvmlDeviceGetName(self._handle(index)))

    def memory_info(self, index: int) -> MemoryInfo:
        # Version 1 counts the driver's reserved memory as used (480 MiB on an idle H100 that
        # nvidia-smi shows with 0 MiB used); version 2 reports it apart. Older drivers lack version 2.
        if self._memory_v2:
            try:
                info = pynvml.nvmlDeviceGetMemoryInfo(self._handle(index), version=pynvml.nvmlMemory_v2)
            except (pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_ArgumentVersionMismatch):
                self._memory_v2 = False
            else:
                return MemoryInfo(total_bytes=int(info.total), used_bytes=int(info.used),
                                  free_bytes=int(info.free), reserved_bytes=int(info.reserved))
        info = pynvml.nvmlDeviceGetMemoryInfo(self._handle(index))
        return MemoryInfo(total_bytes=int(info.total), used_bytes=int(info.used), free_bytes=int(info.free))

    def temperature_c(self, index: int) -> int:
        return int(pynvml.nvmlDeviceGetTemperature(self._handle(index), pynvml.NVML_TEMPERATURE_GPU))

    def slowdown_temperature_c(self, index: int) -> int:
        return int(
            pynvml.nvmlDeviceGetTemperatureThreshold(
                self._handle(index), pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
            )
        )

    def shutdown_temperature_c(self, index: int) -> int:
        return int(
            pynvml.nvmlDeviceGetTemperatureThreshold(
                self._handle(index), pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
            )
        )

    def power_usage_mw(self, index: int) -> int:
        return int(pynvml.nvmlDeviceGetPowerUsage(self._handle(index)))

    def enforced_power_limit_mw(self, index: int) -> int:
        return int(pynvml.nvmlDeviceGetEnforcedPowerLimit(self._handle(index)))

    def utilization(self, index: int) -> UtilizationRates:
        rates = pynvml.nvmlDeviceGetUtilizationRates(self._handle(index))
        return UtilizationRates(gpu_percent=int(rates.gpu), memory_percent=int(rates.memory))

    def clocks_event_reasons(self, index: int) -> int:
        return int(pynvml.nvmlDeviceGetCurrentClocksEventReasons(self._handle(index)))

    def ecc_uncorrected_volatile(self, index: int) -> int:
        return int(
            pynvml.nvmlDeviceGetTotalEccErrors(
                self._handle(index), pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
            )
        )

    def remapped_rows(self, index: int) -> RemappedRows:
        correctable, uncorrectable, pending, failure = pynvml.nvmlDeviceGetRemappedRows(self._handle(index))
        return RemappedRows(
            correctable=int(correctable),
            uncorrectable=int(uncorrectable),
            pending=bool(pending),
            failure=bool(failure),
        )

    def pcie_replay_counter(self, index: int) -> int:
        return int(pynvml.nvmlDeviceGetPcieReplayCounter(self._handle(index)))

    def supported_event_types(self, index: int) -> int:
        return int(pynvml.nvmlDeviceGetSupportedEventTypes(self._handle(index)))

    def create_event_set(self) -> object:
        return pynvml.nvmlEventSetCreate()

    def register_events(self, index: int, event_types: int, event_set: object) -> None:
        pynvml.nvmlDeviceRegisterEvents(self._handle(index), event_types, event_set)

    def wait_event(self, event_set: object, timeout_ms: int) -> NvmlEvent | None:
        try:
            data = pynvml.nvmlEventSetWait_v2(event_set, timeout_ms)
        except pynvml.NVMLError_Timeout:
            return None
        try:
            gpu_index: int | None = int(pynvml.nvmlDeviceGetIndex(data.device))
        except pynvml.NVMLError:
            gpu_index = None
        return NvmlEvent(gpu_index=gpu_index, event_type=int(data.eventType), event_data=int(data.eventData))

    def free_event_set(self, event_set: object) -> None:
        pynvml.nvmlEventSetFree(event_set)
