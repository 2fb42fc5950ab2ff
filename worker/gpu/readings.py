"""One blocking poll of one GPU through an `NvmlBackend` (run it in a worker thread)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import pynvml

from worker.gpu.backend import GPU_LOST_ERRORS, READING_ABSENT_ERRORS, NvmlBackend
from worker.gpu.health import clocks_event_reason_names
from worker.gpu.models import GpuReadings, RemappedRowsReading

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class GpuReader:
    """Reads every supported value of a GPU; a value the device cannot give is left out.

    Raises the GPU-lost errors (`GPU_LOST_ERRORS`) so the caller can fail the GPU. Unexpected NVML
    errors are logged once per (GPU, reading, error) to keep a flaky device from flooding the log.
    """

    def __init__(self, backend: NvmlBackend) -> None:
        self._backend = backend
        self._reported: set[tuple[int, str, str]] = set()

    def _get(self, index: int, reading: str, call: Callable[[int], _T]) -> _T | None:
        try:
            value = call(index)
        except GPU_LOST_ERRORS:
            raise
        except READING_ABSENT_ERRORS:
            return None
        except pynvml.NVMLError as error:
            key = (index, reading, type(error).__name__)
            if key not in self._reported:
                self._reported.add(key)
                logger.warning(
                    "GPU reading failed",
                    extra={"gpu_index": index, "reading": reading, "nvml_error": str(error)},
                )
            return None
        return value

    def read(self, index: int) -> GpuReadings:
        backend = self._backend
        memory = self._get(index, "memory", backend.memory_info)
        utilization = self._get(index, "utilization", backend.utilization)
        power_mw = self._get(index, "power", backend.power_usage_mw)
        limit_mw = self._get(index, "power_limit", backend.enforced_power_limit_mw)
        reasons = self._get(index, "clocks_event_reasons", backend.clocks_event_reasons)
        rows = self._get(index, "remapped_rows", backend.remapped_rows)
        return GpuReadings(
            temperature_c=self._get(index, "temperature", backend.temperature_c),
            temperature_slowdown_c=self._get(index, "temperature_slowdown", backend.slowdown_temperature_c),
            temperature_shutdown_c=self._get(index, "temperature_shutdown", backend.shutdown_temperature_c),
            power_w=None if power_mw is None else power_mw / 1000,
            power_limit_w=None if limit_mw is None else limit_mw / 1000,
            memory_used_bytes=None if memory is None else memory.used_bytes,
            memory_reserved_bytes=None if memory is None else memory.reserved_bytes,
            memory_total_bytes=None if memory is None else memory.total_bytes,
            utilization_gpu_ratio=None if utilization is None else utilization.gpu_percent / 100,
            utilization_memory_ratio=None if utilization is None else utilization.memory_percent / 100,
            clocks_event_reasons=reasons,
            clocks_event_reason_names=[] if reasons is None else clocks_event_reason_names(reasons),
            ecc_uncorrected_volatile=self._get(
                index, "ecc_uncorrected_volatile", backend.ecc_uncorrected_volatile
            ),
            remapped_rows=None
            if rows is None
            else RemappedRowsReading(
                correctable=rows.correctable,
                uncorrectable=rows.uncorrectable,
                pending=rows.pending,
                failure=rows.failure,
            ),
            pcie_replay_count=self._get(index, "pcie_replay_counter", backend.pcie_replay_counter),
        )
