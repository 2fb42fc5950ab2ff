"""`worker doctor`: preflight checks of a node against its models.yaml, before `worker serve`.

Each check prints one PASS / WARN / FAIL / SKIP line (or, with --json, one JSON document); the exit
status is 1 when any check FAILs. The checks of the weights against GPU memory and disk are in
`doctor_weights`, those of the database, Hugging Face access, /dev/shm and tokens in `doctor_checks`.
"""

from __future__ import annotations

import argparse
import errno
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import orjson

from worker.cli.doctor_checks import (
    Check,
    Status,
    check_admin_token,
    check_database,
    check_huggingface,
    check_metrics_token,
    check_shm,
    shm_size,
)
from worker.cli.doctor_weights import check_disk, check_gpu_memory, hub_cache_dir, in_hub_cache, read_gpu_memory
from worker.config import (
    ConfigError,
    EngineKind,
    NodeConfig,
    Settings,
    load_node_config,
    with_engine_override,
)
from worker.engines.process_tree import bind_error
from worker.gpu import NvmlBackend, PynvmlBackend, detect_gpus
from worker.gpu.models import GpuInventory
from worker.registry.client import redacted_url
from worker.registry.describe import quantization_v24

MIN_PYTHON = (3, 11)


def _import_in(python: str, module: str) -> tuple[bool, str]:
    code = f"import {module}; print(getattr({module}, '__version__', '?'))"
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, f"{type(error).__name__}: {error}"
    if done.returncode == 0:
        return True, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "?"
    lines = done.stderr.strip().splitlines()
    return False, lines[-1] if lines else f"exit status {done.returncode}"


@dataclass
class Probes:
    """How the doctor reads the machine; tests replace the parts they script."""

    nvml: NvmlBackend | None = None
    disk_free: Callable[[Path], int] = field(default=lambda path: shutil.disk_usage(path).free)
    import_check: Callable[[str, str], tuple[bool, str]] = _import_in
    shm_size: Callable[[], int | None] = field(default=shm_size)


@dataclass(frozen=True)
class DoctorOptions:
    engine: str = "auto"  # auto | config | mock, as `worker serve --engine`
    host: str | None = None
    port: int | None = None
    min_free_disk_gib: float = 50.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("doctor", help="check this node (GPUs, memory, disk, port, registry, vLLM, "
                                   "billing database, Hugging Face access, /dev/shm, tokens)")
    parser.add_argument("--config", help="path to models.yaml (env WORKER_CONFIG)")
    parser.add_argument("--engine", choices=["auto", "config", "mock"],
                        help="check as `worker serve --engine` would run (env WORKER_ENGINE); mock needs no GPU")
    parser.add_argument("--host", help="override worker.host")
    parser.add_argument("--port", type=int, help="override worker.port")
    parser.add_argument("--min-free-disk-gib", type=float, default=50.0,
                        help="free space wanted for weights whose size cannot be estimated (default 50)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, probes: Probes | None = None) -> int:
    overrides = {key: value for key, value in (("config", args.config), ("engine", args.engine)) if value}
    try:
        settings = Settings.from_env(**overrides)
    except ConfigError as error:
        # `worker serve` would refuse to start: the one finding that matters, reported like the others.
        return report([check_python(), Check("environment", "FAIL", str(error))], as_json=args.json)
    options = DoctorOptions(engine=settings.engine, host=args.host, port=args.port,
                            min_free_disk_gib=args.min_free_disk_gib)
    return report(run_checks(settings, options, probes or Probes()), as_json=args.json)


def report(checks: list[Check], *, as_json: bool) -> int:
    """Print the checks; the exit status is 1 when any FAILed."""
    failed = any(check.status == "FAIL" for check in checks)
    if as_json:
        document = {"ok": not failed, "checks": [asdict(check) for check in checks]}
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        width = max(len(check.name) for check in checks)
        for check in checks:
            sys.stdout.write(f"{check.status:<4}  {check.name:<{width}}  {check.message}\n")
        counts = {status: sum(1 for c in checks if c.status == status) for status in ("FAIL", "WARN")}
        sys.stdout.write(f"doctor: {counts['FAIL']} FAIL, {counts['WARN']} WARN\n")
    return 1 if failed else 0


def run_checks(settings: Settings, options: DoctorOptions, probes: Probes) -> list[Check]:
    checks = [check_python()]
    try:
        config = load_node_config(settings.config)
    except ConfigError as error:
        checks.append(Check("config", "FAIL", str(error)))
        checks.append(check_registry(settings))
        checks.extend(_service_checks(settings))
        return checks
    if options.engine == "mock":
        config = with_engine_override(config, EngineKind.mock)
    checks.append(Check("config", "PASS", f"{settings.config}: {len(config.models)} model(s), "
                                          f"{config.gpus_needed} GPU(s) needed"))
    checks.append(check_listing(config))
    backend = probes.nvml or PynvmlBackend()
    inventory = detect_gpus(backend)
    checks.append(check_nvml(inventory, config))
    checks.append(check_gpu_count(inventory, config, options.engine))
    checks.append(check_gpu_memory(config, read_gpu_memory(backend, inventory)))
    checks.append(check_disk(config, probes.disk_free, options.min_free_disk_gib))
    checks.append(check_port(options.host or config.worker.host, options.port or config.worker.port))
    checks.append(check_registry(settings))
    checks.append(check_vllm(config, settings.engine_python, probes.import_check))
    cache = hub_cache_dir()
    checks.append(check_huggingface(config, lambda repo_id: in_hub_cache(cache, repo_id)))
    checks.append(check_shm(config, probes.shm_size()))
    checks.extend(_service_checks(settings))
    return checks


def _service_checks(settings: Settings) -> list[Check]:
    return [check_database(settings), check_admin_token(settings), check_metrics_token(settings)]


# -- checks -----------------------------------------------------------------------------------------


def check_python(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> Check:
    text = ".".join(str(part) for part in version)
    if version[:2] < MIN_PYTHON:
        return Check("python", "FAIL", f"Python {text}; the worker needs {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer")
    return Check("python", "PASS", f"Python {text}")


def check_listing(config: NodeConfig) -> Check:
    """Routers filter on quantization: a label outside their enum leaves the model unlisted for that filter."""
    unknown = [m.id for m in config.models if m.quantization is not None and quantization_v24(m) is None]
    undeclared = [m.id for m in config.models if quantization_v24(m) is None and m.quantization is None]
    if unknown:
        return Check("listing", "WARN", f"quantization not in OpenRouter's list for {', '.join(unknown)}; use one "
                                        "of int4 int8 fp4 fp6 fp8 fp16 bf16 fp32 mxfp4 nvfp4 mxfp8",
                     {"models": unknown})
    if undeclared:
        return Check("listing", "WARN", f"no quantization declared for {', '.join(undeclared)} (listed as unknown)",
                     {"models": undeclared})
    return Check("listing", "PASS", "every model declares a quantization routers understand")


def check_nvml(inventory: GpuInventory, config: NodeConfig) -> Check:
    detail = {"driver_version": inventory.driver_version, "reason": inventory.reason}
    if not inventory.nvml_available:
        status: Status = "FAIL" if config.gpus_needed else "PASS"
        need = "models need a GPU driver" if config.gpus_needed else "no model needs a GPU"
        return Check("nvml", status, f"NVML unavailable ({inventory.reason}); {need}", detail)
    if inventory.unreadable:
        return Check("nvml", "FAIL", f"driver {inventory.driver_version}; GPUs NVML cannot read: "
                                     f"{sorted(inventory.unreadable)} (lost or reset required)",
                     {**detail, "unreadable": {str(k): v for k, v in inventory.unreadable.items()}})
    return Check("nvml", "PASS", f"driver {inventory.driver_version}, {inventory.count} GPU(s)", detail)


def check_gpu_count(inventory: GpuInventory, config: NodeConfig, engine: str) -> Check:
    needed, present = config.gpus_needed, inventory.count
    detail = {"needed": needed, "present": present, "gpus": [g.name for g in inventory.gpus]}
    if needed == 0:
        return Check("gpus", "PASS", f"no model needs a GPU ({present} present)", detail)
    if present >= needed:
        return Check("gpus", "PASS", f"{needed} of {present} GPU(s) needed", detail)
    hint = " (`worker serve --engine auto` would serve them on the CPU mock engine instead)" \
        if engine == "auto" and present == 0 else ""
    return Check("gpus", "FAIL", f"models need {needed} GPU(s); this node has {present}{hint}", detail)


def check_port(host: str, port: int) -> Check:
    error = bind_error(host, port)
    if error is not None:
        reason = {errno.EADDRINUSE: "already in use", errno.EACCES: "permission denied"}.get(
            error.errno or 0, error.strerror or str(error))
        return Check("port", "FAIL", f"cannot listen on {host}:{port}: {reason}", {"host": host, "port": port})
    return Check("port", "PASS", f"{host}:{port} is free", {"host": host, "port": port})


def check_registry(settings: Settings) -> Check:
    if settings.registry_url is None:
        return Check("registry", "SKIP", "no registry configured (WORKER_REGISTRY_URL)")
    url = str(settings.registry_url)
    shown = redacted_url(url)
    headers = {}
    if settings.registry_token is not None:
        headers["authorization"] = f"Bearer {settings.registry_token.get_secret_value()}"
    try:
        response = httpx.get(url, headers=headers, timeout=settings.registry_timeout_s)
    except httpx.HTTPError as error:
        return Check("registry", "FAIL", f"{shown} unreachable: {type(error).__name__}", {"url": shown})
    status = response.status_code
    if status in (401, 403):
        return Check("registry", "FAIL", f"{shown} refused the token (HTTP {status})", {"url": shown})
    if status >= 500:
        return Check("registry", "WARN", f"{shown} answers HTTP {status}", {"url": shown})
    return Check("registry", "PASS", f"{shown} reachable (HTTP {status})", {"url": shown})


def check_vllm(config: NodeConfig, python: str, import_check: Callable[[str, str], tuple[bool, str]]) -> Check:
    if not any(m.engine is EngineKind.vllm for m in config.models):
        return Check("vllm", "SKIP", "no model runs on vLLM")
    ok, output = import_check(python, "vllm")
    if ok:
        return Check("vllm", "PASS", f"vllm {output} importable by {python}")
    return Check("vllm", "FAIL", f"{python} cannot import vllm: {output}")


# -- estimates and helpers --------------------------------------------------------------------------
