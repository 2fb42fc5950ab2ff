"""Start-up GPU discovery: which GPUs this node has, or why it has none we can see."""

from __future__ import annotations

import contextlib
import logging

import pynvml

from worker.gpu.backend import GPU_LOST_ERRORS, NvmlBackend
from worker.gpu.models import GpuInfo, GpuInventory
from worker.gpu.pynvml_backend import PynvmlBackend

logger = logging.getLogger(__name__)


def detect_gpus(backend: NvmlBackend | None = None) -> GpuInventory:
    """Blocking but quick (a few NVML calls). Never raises for a missing driver: see `reason`.

    Indexes are NVML's (PCI bus order). CUDA numbers devices the same way only with
    CUDA_DEVICE_ORDER=PCI_BUS_ID; passing UUIDs in CUDA_VISIBLE_DEVICES avoids the question.
    """
    if backend is None:
        backend = PynvmlBackend()
    try:
        backend.init()
    except (pynvml.NVMLError, OSError) as error:
        reason = f"{type(error).__name__}: {error}"
        logger.info("no NVML: treating this node as GPU-less", extra={"reason": reason})
        return GpuInventory(nvml_available=False, reason=reason)
    try:
        return _describe(backend)
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            backend.shutdown()


def _describe(backend: NvmlBackend) -> GpuInventory:
    try:
        count = backend.device_count()
    except pynvml.NVMLError as error:
        return GpuInventory(nvml_available=False, reason=f"nvmlDeviceGetCount failed: {error}")
    try:
        driver: str | None = backend.driver_version()
    except pynvml.NVMLError:
        driver = None
    gpus: list[GpuInfo] = []
    unreadable: dict[int, str] = {}
    for index in range(count):
        try:
            uuid, name = backend.uuid(index), backend.name(index)
        except pynvml.NVMLError as error:
            unreadable[index] = f"{type(error).__name__}: {error}"
            continue
        try:
            memory_total: int | None = backend.memory_info(index).total_bytes
        except GPU_LOST_ERRORS as error:
            unreadable[index] = f"{type(error).__name__}: {error}"
            continue
        except pynvml.NVMLError:
            memory_total = None
        gpus.append(GpuInfo(index=index, uuid=uuid, name=name, memory_total_bytes=memory_total))
    reason = None if count else "NVML found no GPU"
    return GpuInventory(
        nvml_available=True, reason=reason, driver_version=driver, gpus=gpus, unreadable=unreadable
    )
