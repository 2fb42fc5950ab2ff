"""What routers are told about a model's weights: its precision in OpenRouter's enum and its vocabulary size.

models.yaml comes first; for weights in a local directory, the checkpoint's own `config.json` fills in
what models.yaml leaves out. OpenRouter reads `quantization` to route users who ask for a precision, so
anything that maps to no enum value is reported as unknown (None), never guessed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from worker.config import EngineKind, ModelConfig

# OpenRouter's enum (the same in the current and the legacy provider format).
QUANTIZATIONS = ("int4", "int8", "fp4", "mxfp4", "nvfp4", "fp6", "fp8", "mxfp8", "fp16", "bf16", "fp32")
# Other spellings met in models.yaml and checkpoint configs: dtypes, and quantization methods by weight width.
_ALIASES = {
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
    "awq": "int4", "gptq": "int4", "w4a16": "int4", "awq_marlin": "int4", "gptq_marlin": "int4",
    "w8a8": "int8", "w8a16": "int8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "modelopt_fp4": "nvfp4",
}
# compressed-tensors weight schemes (type, num_bits) by enum value.
_WEIGHT_SCHEMES = {("int", 4): "int4", ("int", 8): "int8", ("float", 8): "fp8", ("float", 4): "fp4"}
# quant_method values whose width is in `bits` (GPTQ and AWQ checkpoints come in 4 and 8 bits).
_BITS_METHODS = frozenset({"gptq", "awq", "gptq_marlin", "awq_marlin"})

Source = Literal["models.yaml", "checkpoint"]


def normalise(label: object) -> str | None:
    """An enum value for a precision label ('BF16', 'bfloat16', 'awq', ...), or None if it maps to none."""
    if not isinstance(label, str):
        return None
    name = label.strip().lower()
    name = _ALIASES.get(name, name)
    return name if name in QUANTIZATIONS else None


def declared_quantization(model: ModelConfig) -> str | None:
    """What models.yaml says: `quantization`, else vLLM's `engine_args.quantization`, else `engine_args.dtype`."""
    for label in (model.quantization, model.engine_args.get("quantization"), model.engine_args.get("dtype")):
        value = normalise(label)
        if value is not None:
            return value
    return None


def checkpoint_quantization(config: Mapping[str, Any]) -> str | None:
    """The precision a Hugging Face `config.json` declares: `quantization_config`, else `torch_dtype`."""
    quantization = config.get("quantization_config")
    if isinstance(quantization, Mapping):
        return _quantization_config(quantization)
    # Transformers writes `torch_dtype`; releases since 4.56 write `dtype`.
    return normalise(config.get("torch_dtype", config.get("dtype")))


def _quantization_config(config: Mapping[str, Any]) -> str | None:
    method = str(config.get("quant_method", "")).lower()
    if method in _BITS_METHODS and config.get("bits") in (4, 8):
        return f"int{config['bits']}"
    if method == "bitsandbytes":
        return "int4" if config.get("load_in_4bit") else "int8" if config.get("load_in_8bit") else None
    if method == "modelopt":
        return normalise(config.get("quant_algo"))
    if method == "compressed-tensors":
        return _compressed_tensors(config)
    return normalise(method)


def _compressed_tensors(config: Mapping[str, Any]) -> str | None:
    # llm-compressor writes a format name ("nvfp4-pack-quantized", "float-quantized", "pack-quantized")
    # and per-group weight schemes; one scheme for every group is needed to name a single precision.
    if "nvfp4" in str(config.get("format", "")):
        return "nvfp4"
    groups = config.get("config_groups")
    if not isinstance(groups, Mapping):
        return None
    schemes: set[tuple[str, int]] = set()
    for group in groups.values():
        weights = group.get("weights") if isinstance(group, Mapping) else None
        if not isinstance(weights, Mapping) or not isinstance(weights.get("num_bits"), int):
            return None
        schemes.add((str(weights.get("type")), weights["num_bits"]))
    if len(schemes) != 1:
        return None
    return _WEIGHT_SCHEMES.get(schemes.pop())


def local_checkpoint(model: ModelConfig) -> Path | None:
    """The directory holding the model's weights when `source` is one on this machine."""
    if model.engine is EngineKind.external:
        return None
    directory = Path(model.source).expanduser()
    return directory if directory.is_dir() else None


def read_checkpoint_config(model: ModelConfig) -> Mapping[str, Any] | None:
    """The `config.json` of weights in a local directory; None for remote weights or an unreadable file."""
    directory = local_checkpoint(model)
    if directory is None:
        return None
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, Mapping) else None


@dataclass(frozen=True)
class CheckpointFacts:
    quantization: str | None  # an enum value, or None when undeclared
    quantization_source: Source | None
    vocab_size: int | None


def checkpoint_facts(model: ModelConfig) -> CheckpointFacts:
    """Reads the local checkpoint's config.json (once per model: callers keep the result)."""
    checkpoint = read_checkpoint_config(model)
    vocab = checkpoint.get("vocab_size") if checkpoint is not None else None
    vocab_size = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else None
    declared = declared_quantization(model)
    if declared is not None:
        return CheckpointFacts(declared, "models.yaml", vocab_size)
    found = checkpoint_quantization(checkpoint) if checkpoint is not None else None
    return CheckpointFacts(found, "checkpoint" if found is not None else None, vocab_size)
