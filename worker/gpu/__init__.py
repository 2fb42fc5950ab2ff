"""GPU discovery and health monitoring through NVML."""

from worker.gpu.backend import MemoryInfo, NvmlBackend, NvmlEvent, RemappedRows, UtilizationRates
from worker.gpu.collector import GpuMetricsCollector
from worker.gpu.fake import FakeGpu, FakeNvmlBackend
from worker.gpu.health import GpuHealthPolicy, XidClass, classify_xid
from worker.gpu.inventory import detect_gpus
from worker.gpu.models import (
    GpuFleetSnapshot,
    GpuHealth,
    GpuHealthChange,
    GpuInfo,
    GpuInventory,
    GpuReadings,
    GpuStatus,
    HealthReason,
)
from worker.gpu.monitor import GpuMonitor
from worker.gpu.pynvml_backend import PynvmlBackend

__all__ = [
    "FakeGpu",
    "FakeNvmlBackend",
    "GpuFleetSnapshot",
    "GpuHealth",
    "GpuHealthChange",
    "GpuHealthPolicy",
    "GpuInfo",
    "GpuInventory",
    "GpuMetricsCollector",
    "GpuMonitor",
    "GpuReadings",
    "GpuStatus",
    "HealthReason",
    "MemoryInfo",
    "NvmlBackend",
    "NvmlEvent",
    "PynvmlBackend",
    "RemappedRows",
    "UtilizationRates",
    "XidClass",
    "classify_xid",
    "detect_gpus",
]
