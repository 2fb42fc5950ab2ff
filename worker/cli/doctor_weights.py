"""`worker doctor`'s checks of the weights against the node: the GPU memory each engine takes and the disk the
downloads need. Sizes are estimates (the parameter count a model's name gives times the bytes per parameter of
its quantization) unless the weights are in a local directory."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pynvml

from worker.cli.doctor_checks import GIB, Check, Status
from worker.config import EngineKind, ModelConfig, NodeConfig
from worker.gpu import NvmlBackend
from worker.gpu.models import GpuInventory
from worker.registry.describe import quantization_v24

_BYTES_PER_PARAMETER = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "mxfp8": 1.0,
                        "fp6": 0.75, "int4": 0.5, "fp4": 0.5, "mxfp4": 0.5, "nvfp4": 0.5}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# "8x7B" (mixture of experts), then "70B", "1.5B", "560M"; the largest match is the total size.
_EXPERTS = re.compile(r"(?<![\d.])(\d+)x(\d+(?:\.\d+)?)b(?![a-z])", re.IGNORECASE)
_PARAMETERS = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)([bm])(?![a-z])", re.IGNORECASE)
# vLLM's default share of GPU memory; it refuses to start when less than this share is free.
_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# Weights above this share of the engine's memory budget leave little room for the KV cache.
_TIGHT_WEIGHTS_SHARE = 0.85


@dataclass(frozen=True)
class GpuMemory:
    index: int
    total_bytes: int
    free_bytes: int



def read_gpu_memory(backend: NvmlBackend, inventory: GpuInventory) -> list[GpuMemory]:
    if not inventory.nvml_available or not inventory.gpus:
        return []
    readings = []
    try:
        backend.init()
    except (pynvml.NVMLError, OSError):
        return []
    try:
        for gpu in inventory.gpus:
            with contextlib.suppress(pynvml.NVMLError):
                memory = backend.memory_info(gpu.index)
                readings.append(GpuMemory(gpu.index, memory.total_bytes, memory.free_bytes))
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            backend.shutdown()
    return readings


def check_gpu_memory(config: NodeConfig, gpus: list[GpuMemory]) -> Check:
    """vLLM takes `gpu_memory_utilization` of each GPU's total and refuses to start when less is free."""
    if config.gpus_needed == 0:
        return Check("gpu_memory", "SKIP", "no model needs a GPU")
    if not gpus:
        return Check("gpu_memory", "SKIP", "no GPU memory reading")
    by_index = {gpu.index: gpu for gpu in gpus}
    problems: list[tuple[Status, str]] = []
    unknown: list[str] = []
    next_gpu = 0  # replicas take GPUs in order, as the supervisor assigns them
    for model in config.models:
        if model.engine is not EngineKind.vllm:
            continue
        weights = estimate_weight_bytes(model)
        if weights is None:
            unknown.append(model.id)
        count = model.replicas * model.gpus_per_replica
        for index in range(next_gpu, next_gpu + count):
            if index in by_index:
                problems.extend(_gpu_memory_problems(model, by_index[index], weights))
        next_gpu += count
    detail = {"gpus": [asdict(gpu) for gpu in gpus], "size_unknown": unknown}
    if problems:
        status: Status = "FAIL" if any(s == "FAIL" for s, _ in problems) else "WARN"
        return Check("gpu_memory", status, "; ".join(message for _, message in problems), detail)
    note = f" (weight size unknown for {', '.join(unknown)})" if unknown else ""
    return Check("gpu_memory", "WARN" if unknown else "PASS", f"enough free GPU memory{note}", detail)


def _gpu_memory_problems(model: ModelConfig, gpu: GpuMemory, weights: int | None) -> list[tuple[Status, str]]:
    utilization = float(model.engine_args.get("gpu_memory_utilization", _DEFAULT_GPU_MEMORY_UTILIZATION))
    budget = gpu.total_bytes * utilization
    problems: list[tuple[Status, str]] = []
    if gpu.free_bytes < budget:
        message = (f"GPU {gpu.index}: {gib(gpu.free_bytes)} free, {model.id} needs {gib(budget)} "
                   f"(gpu_memory_utilization {utilization})")
        problems.append(("FAIL", message))
    share = weights / model.gpus_per_replica if weights is not None else None
    if share is not None and share > budget:
        problems.append(("FAIL", f"GPU {gpu.index}: {model.id} weights ~{gib(share)} exceed its {gib(budget)} budget"))
    elif share is not None and share > budget * _TIGHT_WEIGHTS_SHARE:
        message = (f"GPU {gpu.index}: {model.id} weights ~{gib(share)} leave little of its {gib(budget)} budget "
                   "for the KV cache")
        problems.append(("WARN", message))
    return problems


def check_disk(config: NodeConfig, disk_free: Callable[[Path], int], min_free_gib: float) -> Check:
    models = [m for m in config.models if m.engine is EngineKind.vllm]
    if not models:
        return Check("disk", "SKIP", "no model downloads weights")
    cache = hub_cache_dir()
    to_download = [m for m in models if not Path(m.source).is_dir() and not in_hub_cache(cache, m.source)]
    free = disk_free(_existing_ancestor(cache))
    detail: dict[str, Any] = {"cache": str(cache), "free_bytes": free, "to_download": [m.id for m in to_download]}
    if not to_download:
        return Check("disk", "PASS", f"weights already on disk; {gib(free)} free at {cache}", detail)
    sizes = {m.id: estimate_weight_bytes(m) for m in to_download}
    unknown = [model_id for model_id, size in sizes.items() if size is None]
    needed = sum(size for size in sizes.values() if size is not None)
    detail["needed_bytes"] = needed
    if needed > free:
        return Check("disk", "FAIL", f"{gib(free)} free at {cache}; weights to download need ~{gib(needed)}",
                     detail)
    if unknown and free - needed < min_free_gib * GIB:
        return Check("disk", "WARN", f"{gib(free)} free at {cache}; size unknown for {', '.join(unknown)} "
                                     f"(wanted {min_free_gib:g} GiB spare)", detail)
    if needed > free * 0.9:
        return Check("disk", "WARN", f"{gib(free)} free at {cache}; weights need ~{gib(needed)}", detail)
    return Check("disk", "PASS", f"{gib(free)} free at {cache}; weights to download ~{gib(needed)}", detail)


def parameter_count(name: str) -> float | None:
    """Parameters named in a model id such as Llama-3.1-8B-Instruct or Mixtral-8x7B; None if it names none."""
    experts = [int(n) * float(size) * 1e9 for n, size in _EXPERTS.findall(name)]
    if experts:
        return max(experts)
    sizes = [float(value) * (1e9 if unit.lower() == "b" else 1e6) for value, unit in _PARAMETERS.findall(name)]
    return max(sizes) if sizes else None


def estimate_weight_bytes(model: ModelConfig) -> int | None:
    source = Path(model.source)
    if source.is_dir():
        return sum(path.stat().st_size for path in source.rglob("*") if path.suffix in _WEIGHT_SUFFIXES)
    for name in (model.hugging_face_id, model.source, model.id):
        count = parameter_count(name) if name else None
        if count is not None:
            width = _BYTES_PER_PARAMETER.get(quantization_v24(model) or "bf16", 2.0)
            return int(count * width)
    return None


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ["HF_HOME"]) if os.environ.get("HF_HOME") else Path.home() / ".cache" / "huggingface"
    return home / "hub"


def in_hub_cache(cache: Path, repo_id: str) -> bool:
    snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")



def gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"
